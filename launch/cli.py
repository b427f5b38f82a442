"""The `manytask` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from manytask.schema import ConfigError


def _train(args: argparse.Namespace) -> int:
    from manytask.config import dump_config, load_config
    from manytask.trainer import distributed as D
    from manytask.trainer.loop import train
    from manytask.trainer.preemption import last_stop_signal

    cfg = load_config(args.recipe, args.overrides)
    if os.environ.get("RANK", "0") == "0":
        print(f"# resolved config ({args.recipe})\n{dump_config(cfg)}", flush=True)
    train(cfg)
    D.shutdown()
    # Ctrl-C of a lone process: checkpointed and stopped; the shell's status for an interrupt.
    return 130 if last_stop_signal() == "SIGINT" and "RANK" not in os.environ else 0


def _config(args: argparse.Namespace) -> int:
    from manytask.config import dump_config, load_config
    from manytask.trainer.preflight import check_recipe

    cfg = load_config(args.recipe, args.overrides)
    check_recipe(cfg)
    print(dump_config(cfg), end="")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from manytask.config import load_config
    from manytask.launch.torchrun import launch
    from manytask.trainer.preflight import check_recipe
    from manytask.trainer.recipe_changes import check_before_launch
    from manytask.trainer.run_lock import check_unlocked

    cfg = load_config(args.recipe, args.overrides)
    check_recipe(cfg)  # one error, before starting N processes
    check_unlocked(Path(cfg.run.dir), cfg.run.lock_lease)
    check_before_launch(cfg)
    return launch(args)


def _prepare(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.prepare import prepare

    prepare(args.name, args.out, force=args.force)
    return 0


def _report(args: argparse.Namespace) -> int:
    from manytask.trainer.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from manytask.config import load_config
    from manytask.trainer.compare import compare

    cfg = load_config(args.recipe, args.overrides)
    if args.weightings:
        from manytask.trainer.sweep import parse_weightings, sweep

        sweep(cfg, parse_weightings(args.weightings), args.seeds, runs_dir=args.runs_dir, reuse=args.reuse)
        return 0
    compare(cfg, runs_dir=args.runs_dir, reuse=args.reuse)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from manytask.launch.torchrun import add_arguments

    parser = argparse.ArgumentParser(prog="manytask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe in this process (or as one torchrun rank)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. trainer.max_steps=200")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)

    p = sub.add_parser("launch", help="train with N processes per node under torchrun")
    add_arguments(p)
    p.set_defaults(func=_launch)

    p = sub.add_parser("config", help="validate a recipe and print it resolved")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_config)

    p = sub.add_parser("data", help="prepare datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="write the shards a recipe reads (demo, synthetic, ...)")
    q.add_argument("name")
    q.add_argument("--out", default=None, help="output directory (default data/<name>)")
    q.add_argument("--force", action="store_true", help="rewrite even if present")
    q.set_defaults(func=_prepare)

    from manytask.data_pipeline.shards_cli import add_shards_parser

    add_shards_parser(sub)

    p = sub.add_parser(
        "compare",
        help="multi-task vs single-task baselines: per-task metrics and Δm (one process)",
        description="Train the recipe's multi-task model and one `single_task` model per task "
        "(same data, steps and encoder), then print each task's primary validation metric "
        "(auc / accuracy / mse), its relative change and the average Δm (> 0: multi-task "
        "better). The runs go one after another in this single process with the single-process "
        "engine, so this is meant for small recipes. Writes <run.dir>/compare/{mtl,single_<task>}/, "
        "compare.md and compare.csv, and a W&B table.",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, applied to every run")
    p.add_argument("--runs-dir", default=None, help="where the runs and tables go (default <run.dir>/compare)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse runs that finished with the same config (read their final val/ metrics "
                   "from metrics.jsonl); resume unfinished ones instead of starting over")
    p.add_argument("--weightings", default=None,
                   help="sweep loss weightings instead: a comma list of weighting names or `all`; equal, "
                   "rlw and a tuned static baseline are always included; writes <run.dir>/sweep/sweep.md")
    p.add_argument("--seeds", type=int, default=1, help="seeds per weighting in a sweep (mean ± std)")
    p.set_defaults(func=_compare)

    from manytask.launch.model_commands import add_model_commands  # eval, predict, export

    add_model_commands(sub)

    p = sub.add_parser("report", help="write PNG plots of a run from its metrics.jsonl")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from manytask.trainer.checkpoint import CheckpointError
    from manytask.trainer.run_lock import RunLocked

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        say_once(f"manytask: config error: {err}")
        return 2
    except (FileNotFoundError, ValueError, RunLocked) as err:
        if os.environ.get("MANYTASK_DEBUG"):
            raise
        say_once(f"manytask: error: {err}")
        return 2
    except CheckpointError as err:  # possibly one rank's own: every rank says it
        if os.environ.get("MANYTASK_DEBUG"):
            raise
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"manytask: checkpoint error{rank}: {err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:  # every rank says it: it may be one rank's own
        from manytask.trainer.memory import out_of_memory_message

        message = out_of_memory_message(err)
        if message is None or os.environ.get("MANYTASK_DEBUG"):
            raise
        print(f"manytask: {message}", file=sys.stderr)
        return 1


OTHER_RANKS_WAIT_S = 5.0


def say_once(message: str) -> None:
    """Print an error that every rank of a job usually meets (a recipe error) once, on stderr.

    Rank 0 (or a lone process) says it at once. Another rank waits first: torchrun stops every
    rank when the first one exits, so if rank 0 met the same error this rank is stopped before
    it repeats it. If the error is this rank's own (a file missing on one node only) it is
    still said, with its rank, after the wait. Exiting silently instead lost the message
    whenever a silent rank happened to exit before rank 0 had printed.
    """
    rank = os.environ.get("RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
        message = f"{message} (rank {rank})"
    print(message, file=sys.stderr, flush=True)


def run() -> None:
    """The `manytask` command (and `python -m manytask.launch.cli`)."""
    if "RANK" not in os.environ:  # not a torchrun / DeepSpeed worker
        sys.exit(main())
    # A torchrun / DeepSpeed worker: the status must be the run's, never a crash in teardown.
    from manytask.trainer.preemption import die_with_parent

    die_with_parent()  # a launcher killed outright still stops (and checkpoints) its ranks
    try:
        code = main()
    except SystemExit as err:  # argparse errors, --help
        if err.code is not None and not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else int(err.code is not None)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    from manytask.trainer import distributed as D

    D.exit_worker(code)


if __name__ == "__main__":
    run()

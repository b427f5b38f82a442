"""`manytask eval / predict / export`: the trained model in use (registered by launch/cli.py).

Each takes RUN_DIR (its newest complete checkpoint) or, with `--checkpoint`, a given
checkpoint directory. Results go to the run directory (`eval/`) or to `--out`, never into a
checkpoint folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path


def _trained(args: argparse.Namespace):  # noqa: ANN202 - a TrainedModel
    from manytask.trainer.checkpoint import CheckpointError
    from manytask.trainer.model_io import load_trained

    try:
        return load_trained(args.checkpoint or args.run_dir, run_dir=args.run_dir if args.checkpoint else None)
    except CheckpointError as err:
        raise ValueError(str(err)) from err


def _outside_checkpoint(path: Path, ckpt: Path) -> Path:
    if path.resolve().is_relative_to(ckpt.resolve()):
        raise ValueError(f"{path}: refusing to write into the checkpoint folder {ckpt}")
    return path


def _data_tag(item: str) -> str:
    """`--data` item -> a name for the output files: `test` for .../test, `narrow-test` for
    narrow=.../test."""
    source, sep, where = item.partition("=")
    return f"{source}-{Path(where).name}" if sep else Path(item).name


def _eval(args: argparse.Namespace) -> int:
    from manytask.trainer import distributed as D
    from manytask.trainer.inference import eval_config, evaluate_model, format_table, metrics_table

    trained = _trained(args)
    info = D.init_distributed(trained.cfg.engine.backend)
    cfg = eval_config(trained.cfg, args.data)
    result = evaluate_model(trained.model, trained.spec, cfg, info, args.batch_size)
    if info.is_rank0:
        rows = metrics_table(result)
        data = {s.name: s.val for s in cfg.data.sources if s.val}
        tag = "val" if not args.data else "_".join(_data_tag(d) for d in args.data)
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag) or "data"
        out_dir = _outside_checkpoint(Path(args.out_dir) if args.out_dir else trained.run_dir / "eval", trained.checkpoint)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{tag}-step{trained.step:08d}"
        record = {
            "run_dir": str(trained.run_dir), "checkpoint": str(trained.checkpoint), "step": trained.step,
            "data": data, "world_size": info.world_size, "metrics": result,
        }
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        with open(stem.with_suffix(".csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["task", "metric", "value"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"# {trained.checkpoint} (step {trained.step}) on {data}")
        print(format_table(rows))
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.csv')}")
    D.shutdown()
    return 0


def _predict(args: argparse.Namespace) -> int:
    from manytask.api import load
    from manytask.trainer.checkpoint import CheckpointError
    from manytask.trainer.predict_file import predict_to_file

    try:
        loaded = load(args.checkpoint or args.run_dir, run_dir=args.run_dir if args.checkpoint else None)
    except CheckpointError as err:
        raise ValueError(str(err)) from err
    out = _outside_checkpoint(Path(args.out), loaded.checkpoint)
    fmt = args.format or ("csv" if out.suffix == ".csv" else "parquet")
    rows = predict_to_file(
        loaded, args.data, out, fmt=fmt, gates=args.gates, batch_size=args.batch_size,
        source=args.source, key_field=args.key,
    )
    print(f"wrote {rows} predictions of {loaded.checkpoint} (step {loaded.step}) to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from manytask.trainer.export import export_model

    trained = _trained(args)
    out = Path(args.out) if args.out else trained.run_dir / "export" / f"model.{args.format}"
    _outside_checkpoint(out, trained.checkpoint)
    for path in export_model(trained, out, args.format):
        print(path)
    return 0


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="a trained run's per-task metrics on its val split or other shards",
                       description="Evaluate RUN_DIR's model (newest complete checkpoint) with the training "
                       "metric code (exact AUROC); prints the table and writes "
                       "RUN_DIR/eval/<data>-step<N>.{json,csv}. Under torchrun the ranks split the data.")
    p.add_argument("run_dir")
    p.add_argument("--data", nargs="+", default=None,
                   help="shards to evaluate: one directory per source in recipe order, or SOURCE=DIR "
                   "(sources not named keep their val split; default: each source's val split)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: newest complete)")
    p.add_argument("--batch-size", type=int, default=None, help="default data.val_batch_size")
    p.add_argument("--out-dir", default=None, help="where the JSON/CSV go (default RUN_DIR/eval)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="per-sample predictions of a trained run for shards or a raw table")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="shards (directory with manifest.json) or a .parquet/.csv table")
    p.add_argument("--out", required=True, help="output file (.parquet, or .csv)")
    p.add_argument("--format", choices=["parquet", "csv"], default=None, help="default: from --out's suffix")
    p.add_argument("--gates", action="store_true", help="add each sample's gate weights per gate")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch-size", type=int, default=4096, help="rows per part written")
    p.add_argument("--source", default=None, help="which training source the data are (default the first)")
    p.add_argument("--key", default=None, help="field/column holding the sample key (default the tar key)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a trained run for serving without manytask (torch.export / ONNX)")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["pt2", "onnx"], default="pt2")
    p.add_argument("--out", default=None, help="artifact path (default RUN_DIR/export/model.<format>)")
    p.add_argument("--checkpoint", default=None)
    p.set_defaults(func=_export)


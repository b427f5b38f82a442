"""Adaptive mixing in real multi-process training: every rank computes the same mixture from
the agreed losses with no extra communication, and a run stopped and resumed (also on another
number of ranks) mixes exactly as the uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_recipe, spawn_ranks, torchrun
from test_resume import final_params, preempt

pytestmark = pytest.mark.slow  # real 2-rank runs

STEPS = 60
# Two sources over the demo shards, each labelling its own tasks, so that the mixture decides
# which tasks a batch trains; the schedule runs loss_ratio into progress into val_loss_ratio
# (evaluations every 10 steps), so every adaptive strategy's state is live during the run.
ADAPTIVE = {
    "strategy": "schedule",
    "schedule": [{"step": 0, "strategy": "loss_ratio"}, {"step": 30, "strategy": "progress"},
                 {"step": 50, "strategy": "val_loss_ratio"}],
    "update_every": 4, "ema": 0.5, "beta": 2.0, "min_prob": 0.1,
}


def mixing_recipe(tmp_path: Path, shards: Path, name: str, **sections) -> Path:
    sources = [
        {"name": "regress", "train": str(shards / "train"), "val": str(shards / "val"), "inputs": ["x"],
         "labels": {"regress_a": "y_a", "regress_b": "y_b"}},
        {"name": "clicks", "train": str(shards / "train"), "val": str(shards / "val"), "inputs": ["x"],
         "labels": {"click": "click"}},
    ]
    sections = {"sampler": ADAPTIVE, **sections, "trainer": {"eval_every": 10, **sections.get("trainer", {})}}
    return small_recipe(tmp_path, shards, name, data={"sources": sources, "num_workers": 0}, **sections)


def rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per step: the train losses and every sampler metric (prob, signal, samples)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = lambda k: k.startswith(("train/", "sampler/"))  # noqa: E731
    return {r["step"]: {k: v for k, v in r.items() if keep(k)} for r in lines if "train/loss" in r}


def _train_and_record(rank: int, port: int, out: dict) -> None:
    """One rank of a real 2-rank training run; records the mixture its own sampler computed
    after every step (the sampler is only watched, not changed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from manytask.config import load_config
    from manytask.trainer import distributed as D
    from manytask.trainer.loop import train
    from manytask.trainer.task_sampler import TaskSampler

    seen: list[tuple[int, bytes, bytes]] = []
    observe = TaskSampler.observe

    def watched(self, step, losses):
        observe(self, step, losses)
        seen.append((step, self.probs(step).tobytes(), self.source_signal("loss_ratio").tobytes(),
                     self.source_signal("val_loss_ratio").tobytes()))

    TaskSampler.observe = watched
    train(load_config(os.environ["MIXING_RECIPE"]))
    out[rank] = seen
    D.shutdown()


def test_every_rank_computes_the_same_adaptive_mixture(tmp_path, demo_shards, monkeypatch):
    schedule = [{"step": 0, "strategy": "loss_ratio"}, {"step": 12, "strategy": "progress"},
                {"step": 18, "strategy": "val_loss_ratio"}]
    recipe = mixing_recipe(tmp_path, demo_shards, "ranks", trainer={"max_steps": 24, "eval_every": 6},
                           sampler={**ADAPTIVE, "schedule": schedule})
    monkeypatch.setenv("MIXING_RECIPE", str(recipe))
    out = spawn_ranks(_train_and_record)
    assert len(out[0]) == 24
    assert out[0] == out[1], "the ranks' mixtures differ"
    probs = {p for _, p, _, _ in out[0]}
    assert len(probs) > 3, "the mixture adapted over the run"


@pytest.fixture(scope="module")
def adaptive_reference(tmp_path_factory, demo_shards) -> Path:
    """One uninterrupted 2-rank run with adaptive mixing: its run directory."""
    tmp = tmp_path_factory.mktemp("adaptive_reference")
    torchrun(mixing_recipe(tmp, demo_shards, "ref"))
    return tmp / "ref" / "run"


def test_adaptive_mixing_resumes_bitwise(tmp_path, demo_shards, adaptive_reference):
    recipe = mixing_recipe(tmp_path, demo_shards, "preempted")
    run = tmp_path / "preempted" / "run"
    preempt(recipe, run, 25)
    torchrun(recipe)  # resume: auto
    got, want = rows(run), rows(adaptive_reference)
    assert sorted(got) == list(range(1, STEPS + 1)), "every step logged exactly once"
    differ = {step: (got[step], want[step]) for step in want if got[step] != want[step]}
    assert not differ, f"steps differ from the uninterrupted run: {differ}"
    probs = {tuple(v for k, v in sorted(r.items()) if k.endswith("/prob")) for r in want.values()}
    assert len(probs) > 5, "the mixture moved during the run"
    val_signal = {r["sampler/clicks/signal_val_loss_ratio"] for r in want.values()}
    assert len(val_signal) > 3, "the validation-driven signal moved at evaluations"
    a, b = final_params(run), final_params(adaptive_reference)
    assert all(torch.equal(a[k], b[k]) for k in b), "final parameters differ"


def test_adaptive_mixing_resumes_on_one_rank(tmp_path, adaptive_reference):
    """The 2-rank run continued on 1 rank: the mixing state carries over exactly — the
    mixture until the next update is the one the 2-rank run's last checkpoint holds."""
    from manytask.config import load_config
    from manytask.data_pipeline.sources import source_sizes
    from manytask.trainer.task_sampler import TaskSampler

    run = tmp_path / "run"
    shutil.copytree(adaptive_reference, run)
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(adaptive_reference.parent / "recipe.yaml", recipe)
    torchrun(recipe, f"run.dir={run}", f"trainer.max_steps={STEPS + 8}", nproc=1)
    got = rows(run)
    assert sorted(got) == list(range(1, STEPS + 9))

    cfg = load_config(recipe)
    saved = TaskSampler([s.name for s in cfg.data.sources], source_sizes(cfg), cfg.sampler, cfg.run.seed,
                        STEPS, cfg.data.batch_size, {s.name: list(s.labels) for s in cfg.data.sources})
    common = adaptive_reference / "ckpt" / f"step_{STEPS:08d}" / "common.pt"
    saved.load_state_dict(torch.load(common, weights_only=True)["sampler"])
    mixture = lambda r: {k: v for k, v in r.items() if k.endswith("/prob") or "/signal" in k}  # noqa: E731
    # steps 61-63: no update (every 4 steps) and no evaluation, so the saved mixture holds
    assert mixture(got[61]) == mixture(saved.metrics(61)) == mixture(got[63])
    assert mixture(got[64]) != mixture(got[63]), "updates go on after the resume"


def test_report_draws_the_mixture_of_a_real_run(tmp_path, adaptive_reference):
    from PIL import Image

    from manytask.trainer.logger import read_metrics
    from manytask.trainer.plots import mixture_over_time
    from manytask.trainer.report import series, write_report

    run = tmp_path / "run"
    shutil.copytree(adaptive_reference, run)
    paths = {p.name: p for p in write_report(run)}
    with Image.open(paths["sampler.png"]) as image:
        assert image.format == "PNG" and image.size[1] > 500
    rows = read_metrics(run)
    probs = {s: series(rows, f"sampler/{s}/prob") for s in ("regress", "clicks")}
    fig = mixture_over_time(probs, {"click": series(rows, "train/click/loss")},
                            {"clicks": series(rows, "sampler/clicks/signal_val_loss_ratio")})
    top, losses, signals = fig.axes[:3]
    assert len(top.collections) == 2, "one stacked band per source"
    assert len(probs["clicks"][0]) == STEPS and len(losses.lines) == 1 and len(signals.lines) == 1

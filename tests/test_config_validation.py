"""A recipe is checked whole before anything starts: `manytask config` and `manytask launch`
refuse a misspelled model or weighting (naming the closest), unknown or mistyped `params`,
fields the manifests lack and out-of-range numbers — one error naming key, value and what
was expected, exit status 2, and `launch` starts no process."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_recipe

from manytask.launch.cli import main
from manytask.models import MODELS
from manytask.trainer.weightings import WEIGHTINGS

BAD = [
    ("model.name=mmoee", "'model.name' in .*: unknown model 'mmoee'; did you mean 'mmoe'\\?"),
    ("weighting.name=gradnrm", "'weighting.name' in .*: unknown weighting 'gradnrm'; did you mean 'gradnorm'\\?"),
    ("model.params.num_expert=3", "unknown key 'model.params.num_expert' .*did you mean 'model.params.num_experts'"),
    ("model.params.expert_hidden=wide", "'model.params.expert_hidden' .*expected a list, got 'wide'"),
    ("weighting.params.alpha=x", "unknown key 'weighting.params.alpha'"),
    ("trainer.max_steps=-1", "'trainer.max_steps' .*expected a number >= 1, got -1"),
    ("checkpoint.every=-5", "'checkpoint.every' .*expected a number >= 1, got -5"),
    ("checkpoint.every=0", "'checkpoint.every' .*expected a number >= 1, got 0"),
    ("trainer.eval_every=0", "'trainer.eval_every' .*>= 1, got 0"),
    ("trainer.log_every=0", "'trainer.log_every' .*>= 1, got 0"),
    ("trainer.grad_accum=0", "'trainer.grad_accum' .*>= 1, got 0"),
    ("data.val_batch_size=0", "'data.val_batch_size' .*>= 1, got 0"),
    ("data.num_workers=-1", "'data.num_workers' .*>= 0, got -1"),
    ("trainer.warmup_steps=-3", "'trainer.warmup_steps' .*>= 0, got -3"),
    ("trainer.grad_clip=-1", "'trainer.grad_clip' .*>= 0, got -1"),
    ("trainer.lr=-0.1", "'trainer.lr' .*expected a learning rate > 0, got -0.1"),
    ("trainer.lr=.nan", "'trainer.lr' .*got nan"),
    ("run.resume=sometimes", "'run.resume' .*expected auto, never or an existing checkpoint directory, got 'sometimes'"),
    ("data.sources.synthetic.inputs=[nope]", "data.sources.synthetic.inputs: field 'nope' is not in .*manifest.json"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_config_refuses_naming_key_value_and_expectation(tmp_path, demo_shards, capsys, override, message):
    recipe = write_recipe(tmp_path, demo_shards)
    assert main(["config", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err


def test_launch_prints_one_error_and_starts_no_process(tmp_path, demo_shards):
    recipe = write_recipe(tmp_path, demo_shards)
    proc = subprocess.run([sys.executable, "-m", "manytask.launch.cli", "launch", "--nproc", "2", str(recipe),
                           "model.name=mmoee"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"manytask: config error: 'model.name' in {recipe}: unknown model 'mmoee'; did you mean 'mmoe'? "
        "(models: " + ", ".join(MODELS) + ")"
    ]
    assert not (tmp_path / "run").exists(), "nothing started, nothing written"


def test_good_recipe_passes_and_every_registry_entry_carries_its_params(tmp_path, demo_shards, capsys):
    assert main(["config", str(write_recipe(tmp_path, demo_shards))]) == 0
    assert "model:" in capsys.readouterr().out
    for entry in MODELS.values():
        assert dataclasses.is_dataclass(entry.params)
        assert all(key in {f.name for f in dataclasses.fields(entry.params)} for key in entry.task_path)
    assert all(dataclasses.is_dataclass(cls.Params) for cls in WEIGHTINGS.values())

"""Recipes: loading, overrides, and errors that name the key, the file and the fix."""

import re
from pathlib import Path

import pytest
import yaml

from manytask.config import dump_config, load_config
from manytask.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """
data:
  sources:
    - {name: s, train: data/x/train, inputs: [x], labels: {a: y_a, b: y_b}}
tasks:
  a: {type: regression}
  b: {type: binary}
"""


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        cfg = load_config(recipe)
        assert cfg.tasks, recipe


def test_overrides_are_typed_and_apply(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["trainer.max_steps=200", "data.batch_size=64",
                                              "data.sources.s.train=elsewhere", "run.dir=/tmp/r"])
    assert cfg.trainer.max_steps == 200 and cfg.data.batch_size == 64
    assert cfg.data.sources[0].train == "elsewhere" and cfg.run.dir == "/tmp/r"
    assert cfg.trainer.lr == pytest.approx(1e-3)  # default kept


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, BASE + "trainer:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trainer.max_step" in msg and str(path) in msg and "trainer.max_steps" in msg


def test_typo_in_override_is_caught(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'data.batch_size'"):
        load_config(write(tmp_path, BASE), ["data.batchsize=3"])


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'trainer.max_steps'.*expected int, got 'many'"):
        load_config(write(tmp_path, BASE), ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'tasks.a.type'.*'regresion' is not one of.*did you mean 'regression'"):
        load_config(write(tmp_path, BASE.replace("type: regression", "type: regresion")))


def test_label_for_unknown_task_and_unlabelled_task(tmp_path):
    with pytest.raises(ConfigError, match="unknown task; did you mean 'b'"):
        load_config(write(tmp_path, BASE.replace("b: y_b}", "bb: y_b}")))
    with pytest.raises(ConfigError, match="'tasks.c'.*no source labels this task"):
        load_config(write(tmp_path, BASE + "  c: {type: binary}\n"))


@pytest.mark.parametrize("name", ["a/b", "click rate", "(shared)"])
def test_task_name_that_cannot_be_a_metric_key_is_refused(tmp_path, name):
    recipe = BASE.replace("a: y_a", f"'{name}': y_a").replace("  a: {type", f"  '{name}': {{type")
    with pytest.raises(ConfigError, match=rf"'tasks.{re.escape(name)}'.*only letters, digits"):
        load_config(write(tmp_path, recipe))


def test_zero3_refuses_what_needs_full_shared_gradients(tmp_path):
    recipe = write(tmp_path, BASE + "engine: {name: deepspeed, deepspeed: {zero_optimization: {stage: 3}}}\n")
    assert load_config(recipe).engine.deepspeed["zero_optimization"]["stage"] == 3  # fine by itself
    with pytest.raises(ConfigError, match=r"'monitor.affinity_every'.*ZeRO stage 3.*affinity_every=0"):
        load_config(recipe, ["monitor.affinity_every=10"])
    # the gradient methods' per-task gradients are partitioned like ZeRO-3's own
    assert load_config(recipe, ["weighting.name=gradnorm"]).weighting.name == "gradnorm"
    assert load_config(recipe, ["weighting.name=pcgrad"]).weighting.name == "pcgrad"
    with pytest.raises(ConfigError, match=r"'weighting.name'.*db_mtl runs under DeepSpeed only at ZeRO stages 0, 1, 2, not stage 3"):
        load_config(recipe, ["weighting.name=db_mtl"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["trainer.lr=0.01"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg))["trainer"]["lr"] == 0.01

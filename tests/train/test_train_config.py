import doctest
import importlib

import pytest

from sparseforge.errors import ConfigError
from sparseforge.train.config import (GMPConfig, RigLConfig, SETConfig, SparseTrainConfig, StaticConfig,
                                      dump_train_recipe, load_train_recipe, parse_train_recipe)

DST = {"end_step": 750, "update_interval": 100}


@pytest.mark.parametrize("cfg", [
    StaticConfig(sparsity=0.8, pattern="block4x4", distribution="erk", seed=3),
    StaticConfig(pattern="2:4"),
    GMPConfig(sparsity=0.9, initial_sparsity=0.1, schedule={"start_step": 100, "end_step": 500}),
    SETConfig(sparsity=0.95, drop_fraction=0.2, schedule=DST, ignore=["head"], dense_first=True),
    RigLConfig(sparsity=0.9, pattern="fanin", targets=["*.mlp.*"], schedule=DST),
])
def test_recipe_round_trip(cfg, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(dump_train_recipe(cfg))
    back = load_train_recipe(path)
    assert back == cfg and type(back) is type(cfg)
    assert SparseTrainConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_follow_the_papers():
    r = RigLConfig(sparsity=0.9, schedule=DST)
    assert (r.drop_fraction, r.drop_fraction_decay, r.schedule.update_interval) == (0.3, "cosine", 100)
    assert SETConfig(sparsity=0.9, schedule=DST).drop_fraction_decay == "constant"
    assert StaticConfig(pattern="2:4").sparsity is None


@pytest.mark.parametrize("text, match", [
    ("version: 2\ntrain: {method: rigl}", "version"),
    ("train: {method: prune_all, sparsity: 0.5}", "unknown training method"),
    ("train: {sparsity: 0.5}", "needs a 'method'"),
    ("train: {method: static, sparsty: 0.5}", "unknown key"),
    ("train: {method: static, sparsity: 1.0}", r"\[0, 1\)"),
    ("train: {method: static}", "needs a sparsity"),
    ("train: {method: static, sparsity: 0.5}\nextra: 1", "top-level"),
    ("train: {method: rigl, sparsity: 0.9}", "end_step"),
    ("train: {method: rigl, sparsity: 0.9, schedule: {end_step: 50, start_step: 60}}", "ends before it starts"),
    ("train: {method: rigl, sparsity: 0.9, schedule: {end_step: 500, update_interval: 0}}", "update_interval"),
    ("train: {method: rigl, sparsity: 0.9, schedule: {end_step: 500, every: 3}}", "unknown key"),
    ("train: {method: rigl, sparsity: 0.9, schedule: {end_step: 100}}", "no mask update"),
    ("train: {method: gmp, sparsity: 0.9, schedule: {end_step: 250}}", "multiple of update_interval"),
    ("train: {method: gmp, sparsity: 0.5, initial_sparsity: 0.6, schedule: {end_step: 200}}", "exceeds"),
    ("train: {method: rigl, pattern: '2:4', schedule: {end_step: 500}}", "N:M"),
    ("train: {method: gmp, pattern: '2:4', schedule: {end_step: 500}}", "N:M"),
    ("train: {method: static, pattern: '2:4', sparsity: 0.7}", "fixes the sparsity"),
    ("train: {method: static, pattern: '2:4', distribution: erk}", "uniform"),
    ("train: {method: rigl, sparsity: 0.9, drop_fraction: 1.0, schedule: {end_step: 500}}", "drop_fraction"),
    ("train: {method: rigl, sparsity: 0.9, drop_fraction_decay: linear, schedule: {end_step: 500}}", "decay"),
    ("train: {method: static, sparsity: 0.5, distribution: random}", "unknown distribution"),
    ("train: {method: static, sparsity: 0.5, targets: 'fc1'}", "lists"),
    ("train: {method: static, sparsity: 0.5, dense_first: 1}", "true or false"),
    (": bad yaml: [", "YAML"),
])
def test_bad_recipes(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_train_recipe(text)


def test_bare_mapping_is_a_recipe_and_missing_file():
    assert parse_train_recipe("method: static\nsparsity: 0.5") == StaticConfig(sparsity=0.5)
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(ConfigError, match="got method"):
        RigLConfig.from_dict({"method": "set", "sparsity": 0.5, "schedule": DST})


@pytest.mark.parametrize("module", ["config", "density", "schedules", "updates", "methods", "base"])
def test_doctests(module):
    mod = importlib.import_module(f"sparseforge.train.{module}")
    result = doctest.testmod(mod)
    assert result.failed == 0


def test_package_doctest():
    import sparseforge.train

    assert doctest.testmod(sparseforge.train).failed == 0

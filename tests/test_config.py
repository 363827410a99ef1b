import pytest

from sparseforge.config import CalibrationConfig, SparsifyConfig, dump_recipe, load_recipe, name_matches, parse_recipe
from sparseforge.errors import ConfigError


def test_recipe_round_trip(tmp_path):
    configs = [SparsifyConfig(method="magnitude", sparsity=0.3, ignore=["*.o_proj"]),
               SparsifyConfig(method="sparsegpt", pattern="4:8", overrides={"*.mlp.*": 0.5},
                              method_options={"blocksize": 64}, calibration=CalibrationConfig(samples=8))]
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(configs))
    assert load_recipe(path) == configs


@pytest.mark.parametrize("text, match", [
    ("version: 2\nstages: [{method: wanda}]", "version"),
    ("stages: []", "non-empty"),
    ("stages: [{method: prune_everything}]", "unknown method"),
    ("stages: [{method: wanda, sparsty: 0.5}]", "unknown key"),
    ("stages: [{method: wanda, sparsity: 1.2}]", r"\[0, 1\)"),
    ("stages: [{method: wanda, pattern: '3:2'}]", "0 < N < M"),
    ("stages: [{method: wanda, calibration: {samples: 0}}]", "positive integer"),
    ("stages: [{method: wanda}]\nextra: 1", "top-level"),
    ("stages: [{method: wanda, targets: '*.mlp'}]", "lists"),
    (": bad yaml: [", "YAML"),
])
def test_bad_recipes(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe(text)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_single_stage_mapping_is_a_recipe():
    assert parse_recipe("method: wanda\npattern: '2:4'")[0].sparsity == 0.5


def test_name_matching():
    assert name_matches("model.layers.0.mlp.up_proj", "*.mlp.*")
    assert name_matches("model.layers.0.mlp.up_proj", "re:model\\.layers\\.\\d+\\.mlp\\..*")
    assert not name_matches("model.layers.0.self_attn.q_proj", "*.mlp.*")


def test_overrides_last_match_wins():
    cfg = SparsifyConfig(sparsity=0.5, overrides={"*.mlp.*": 0.6, "*.down_proj": 0.7})
    assert cfg.sparsity_for("m.mlp.down_proj") == 0.7
    assert cfg.sparsity_for("m.mlp.up_proj") == 0.6
    assert cfg.sparsity_for("m.attn.q", allocated=0.4) == 0.4

import pytest

from sparseforge.errors import ConfigError
from sparseforge.finetune import FinetuneConfig


def test_loss_mixes_parse():
    assert FinetuneConfig(loss="ce").weights == {"ce": 1.0}
    assert FinetuneConfig(loss="ce=1,squarehead=0.5").weights == {"ce": 1.0, "squarehead": 0.5}
    assert FinetuneConfig(loss={"kd": 2, "ce": 1}).weights == {"kd": 2.0, "ce": 1.0}
    assert FinetuneConfig(loss="ce").needs_teacher is False
    assert FinetuneConfig(loss="ce+kd").needs_teacher is True
    cfg = FinetuneConfig(loss="ce+squarehead", steps=3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0}, "lr must be a positive number"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"loss": "mse"}, "unknown loss 'mse'"),
    ({"loss": "ce=0"}, "every loss weight is 0"),
    ({"loss": "ce=x"}, "not a number"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"seqlen": 1}, "seqlen must be an integer >= 2"),
    ({"teacher_dtype": "float16"}, "teacher_dtype must be one of"),
    ({"temperature": 0}, "temperature must be a positive number"),
])
def test_bad_config_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        FinetuneConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown finetune options"):
        FinetuneConfig.from_dict({"stepz": 3})


def test_warmup_defaults_to_a_tenth_of_the_steps_and_the_schedule_decays_to_zero():
    from sparseforge.finetune.loop import lr_schedule

    cfg = FinetuneConfig(steps=50)
    assert cfg.warmup_steps == 5
    assert FinetuneConfig(steps=3).warmup_steps == 1
    assert FinetuneConfig(steps=50, warmup_steps=0).warmup_steps == 0
    factor = lr_schedule(cfg)
    assert [factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(5) == pytest.approx(1.0) and factor(49) == pytest.approx(1 / 45) and factor(50) == 0.0
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


def test_dropout_option_must_be_a_bool():
    assert FinetuneConfig().dropout is False
    with pytest.raises(ConfigError, match="dropout must be true or false"):
        FinetuneConfig(dropout="yes")

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

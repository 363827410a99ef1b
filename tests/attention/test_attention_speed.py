"""sparseforge.attention.speed.decode_speed: whole-model decode steps over a pre-filled cache."""

from __future__ import annotations

import pytest

from sparseforge.attention import Dense, Quest, StreamingLLM
from sparseforge.attention.speed import decode_speed
from sparseforge.errors import ConfigError
from tiny_models import tiny_model


def test_decode_speed_reports_each_policy():
    model = tiny_model("qwen2")
    r = decode_speed(model, 200, {"dense": Dense(), "quest": Quest(budget=32, dense_layers=0),
                                  "streaming": StreamingLLM(4, 12)}, steps=2)
    assert all(v["tokens_per_s"] > 0 for v in r.values())
    assert r["dense"]["read_fraction"] == 1.0
    # one decode step at 201 cached tokens: Quest reads 1 complete page + the newest (tokens 192..200)
    assert r["quest"]["read_fraction"] == pytest.approx((16 + 9) / 201)
    assert r["streaming"]["read_fraction"] == pytest.approx(16 / 201)
    # the cache holds the context (cropped back after each step): 2 layers x K and V x Hkv 2 x dim 8 x 4 bytes
    assert r["dense"]["kv_bytes"] == 2 * 2 * 200 * 2 * 8 * 4


def test_decode_speed_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="context >= 1"):
        decode_speed(model, 0, {"dense": Dense()})
    with pytest.raises(ConfigError, match="at least one policy"):
        decode_speed(model, 10, {})

"""The KV-cache size checks every attention kernel shares (csrc/attention_checks.h check_kv_cache):
decode, compressed-KV decode, Quest selection and prefill refuse the same bad shapes with the same
message, each naming its kernel."""

from __future__ import annotations

import numpy as np
import pytest

from sparseforge.kernels import native

f32 = np.float32


def _decode(name, B=1, Hq=2, Hkv=1, D=8, cap=16, n=16):
    q, kv = np.zeros((B, Hq, D), f32), np.zeros((B, Hkv, cap, D), f32)
    spans = np.tile(np.array([0, max(1, min(n, cap))], np.int32), (B, Hkv, 1, 1))
    getattr(native(), name)(q, kv, kv, spans, n, 1.0, np.zeros((B, Hq, D), f32))


def _prefill(name, B=1, Hq=2, Hkv=1, D=8, cap=16, n=16, Tq=4):
    q, kv = np.zeros((B, Hq, Tq, D), f32), np.zeros((B, Hkv, cap, D), f32)
    getattr(native(), name)(q, kv, kv, n, 1.0, 0, 1 << 20, 0, 1 << 20, np.zeros((B, Tq, Hq, D), f32))


def _quest(name, B=1, Hq=2, Hkv=1, D=8, cap=4, n=4, keep=2):
    q, k = np.zeros((B, Hq, D), f32), np.zeros((B, Hkv, cap, D), f32)
    getattr(native(), name)(q, k, k, n, np.zeros((B, Hkv, keep), np.int32))


KERNELS = [("decode attention", _decode, "decode_attention"), ("decode attention", _decode, "decode_attention_ref"),
           ("prefill attention", _prefill, "prefill_attention"), ("prefill attention", _prefill, "prefill_attention_ref"),
           ("Quest selection", _quest, "quest_select"), ("Quest selection", _quest, "quest_select_ref")]


@pytest.mark.parametrize("what, call, name", KERNELS)
def test_bad_cache_shapes_get_the_shared_message(what, call, name):
    call(name)  # the good shape runs
    with pytest.raises(ValueError, match=rf"^{what}.*: query heads \(3\) must be a multiple of key/value heads \(2\)$"):
        call(name, Hq=3, Hkv=2)
    with pytest.raises(ValueError, match=rf"^{what}.* needs B, Hq, Hkv, D >= 1 and \d+ <= n <= cap; got B=1 Hq=2 Hkv=1 D=8 n=17 cap=16"):
        call(name, n=17, cap=16)


def test_prefill_needs_the_queries_inside_the_cache():
    with pytest.raises(ValueError, match="prefill attention needs B, Hq, Hkv, D >= 1 and 4 <= n <= cap; got .* n=3 cap=16"):
        _prefill("prefill_attention", n=3, Tq=4)


def test_decode_needs_a_valid_token():
    with pytest.raises(ValueError, match="decode attention needs B, Hq, Hkv, D >= 1 and 1 <= n <= cap; got .* n=0"):
        _decode("decode_attention", n=0)


def test_quest_keep_is_checked_after_the_cache():
    with pytest.raises(ValueError, match="Quest selection needs 0 <= keep <= pages; got keep=3 pages=2"):
        _quest("quest_select", n=2, keep=3)

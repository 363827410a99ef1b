"""The machine facts every measurement carries: the last-level cache size read from sysfs / sysconf."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseforge.errors import ConfigError
from sparseforge.runtime import advise, machine
from sparseforge.runtime.machine import FALLBACK_LLC_BYTES, last_level_cache, parse_cache_size, set_threads


def fake_sysfs(root: Path, caches: list[tuple[int, str, str]]) -> Path:
    """``root/index<i>/{level,type,size}`` as Linux lays out /sys/devices/system/cpu/cpu0/cache."""
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_the_highest_level_data_or_unified_cache_wins(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"), (3, "Unified", "36M")])
    assert last_level_cache(root) == machine.CacheSize(36 << 20, "sysfs L3 (index3)")


def test_an_instruction_cache_or_a_malformed_entry_is_skipped(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "32K"), (2, "Unified", "1M"), (3, "Instruction", "64M"), (3, "Unified", "lots")])
    assert last_level_cache(root) == machine.CacheSize(1 << 20, "sysfs L2 (index1)")


def test_without_sysfs_sysconf_then_the_stated_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sysconf_names", {"SC_LEVEL3_CACHE_SIZE": 1, "SC_LEVEL2_CACHE_SIZE": 2})
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_LEVEL3_CACHE_SIZE": 0, "SC_LEVEL2_CACHE_SIZE": 3 << 20}[name])
    assert last_level_cache(tmp_path / "missing") == machine.CacheSize(3 << 20, "sysconf SC_LEVEL2_CACHE_SIZE")
    monkeypatch.setattr(os, "sysconf_names", {})
    llc = last_level_cache(tmp_path / "missing")
    assert llc.nbytes == FALLBACK_LLC_BYTES and llc.source.startswith("fallback") and "32 MiB" in llc.source


@pytest.mark.parametrize("text, expected", [("48K", 48 << 10), ("2048K\n", 2 << 20), ("36M", 36 << 20), ("1G", 1 << 30), ("512", 512)])
def test_parse_cache_size(text, expected):
    assert parse_cache_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "0K", "-1K", "12Q", "1.5M"])
def test_parse_cache_size_refuses_garbage(text):
    with pytest.raises(ValueError, match="not a cache size"):
        parse_cache_size(text)


@given(st.integers(1, 1 << 20), st.sampled_from(["", "K", "M", "G"]))
def test_parse_cache_size_round_trip(n, unit):
    assert parse_cache_size(f"{n}{unit}") == n * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def test_machine_info_names_the_cache_and_its_source():
    info = machine.machine_info(set_threads(1))
    assert info["llc_bytes"] == last_level_cache().nbytes > 0 and info["llc_source"] == last_level_cache().source


def test_set_threads_refuses_zero():
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        set_threads(0)


@pytest.mark.parametrize("llc, streams", [(1 << 10, True), (1 << 40, False)])
def test_the_advisor_streams_exactly_when_the_model_exceeds_this_machines_cache(monkeypatch, llc, streams):
    seen = []
    real = advise.measure_layer

    def spy(w, **kw):
        seen.append(kw["stream"])
        return real(w, **{**kw, "budget_s": 0.001})

    monkeypatch.setattr(advise, "last_level_cache", lambda: machine.CacheSize(llc, "test"))
    monkeypatch.setattr(advise, "measure_layer", spy)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))  # 8 KiB of weights
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(32, 64) > 0.9)
    advise.advise_model(net, threads=1)
    assert seen == [streams]

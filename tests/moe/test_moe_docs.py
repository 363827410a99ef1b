"""docs/moe.md stays true: its example runs, its router and estimator tables match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparseforge.moe.routers import ROUTERS
from sparseforge.moe.sparsemixer import ESTIMATORS

DOC = Path(__file__).resolve().parents[2] / "docs" / "moe.md"


@pytest.fixture(scope="module")
def text():
    return DOC.read_text()


def test_python_examples_run(text):
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})


def test_router_table_lists_every_router(text):
    table = text.split("## Routers", 1)[1].split("##", 1)[0]
    names = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert names == set(ROUTERS)


def test_decode_section_matches_code(text):
    from sparseforge.moe.layer import DECODE_BACKENDS, NATIVE_MAX_TOKENS
    from sparseforge.ops.expert_ffn import NATIVE_ACTIVATIONS

    section = text.split("## Decode kernel", 1)[1].split("\n## ", 1)[0]
    assert f"at most {NATIVE_MAX_TOKENS} tokens" in section
    assert all(f'`"{b}"`' in section for b in DECODE_BACKENDS)
    assert all(f"`{a}`" in section for a in NATIVE_ACTIVATIONS)


def test_estimator_table_matches_constants(text):
    assert f"u <= {ESTIMATORS['midpoint'].coin}" in text and "pi_D / 2" in text
    assert f"{ESTIMATORS['heun3'].low} pi_D" in text and f"u <= {ESTIMATORS['heun3'].coin}" in text
    assert f"`{ESTIMATORS['midpoint'].grad_factor:g} g pi_D (e_D - pi)`" in text


@pytest.mark.parametrize(
    "module",
    ["__init__", "routers", "sparsemixer", "dispatch", "grouped", "losses", "layer", "hf", "swap", "upcycle",
     "expert_pruning", "expert_sparsity", "parallel", "dense", "config", "ops.expert_ffn", "bf16x3", "ops.bf16x3"],
)
def test_docstring_examples(module):
    import doctest
    import importlib

    name = module if module.startswith("ops.") else f"moe.{module}"
    mod = importlib.import_module("sparseforge.moe" if module == "__init__" else f"sparseforge.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

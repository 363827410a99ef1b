"""docs/attention.md: its Python example runs as written and prints what it says; the policies and
errors it lists exist."""

from __future__ import annotations

import re
from pathlib import Path

import sparseforge.attention as attention

DOC = Path(__file__).resolve().parents[2] / "docs" / "attention.md"


def test_python_example_runs(capsys):
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    exec(compile(block, str(DOC), "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 320]) 319"


def test_every_policy_in_the_table_is_exported():
    text = DOC.read_text()
    for name in re.findall(r"^\| `(\w+)\(", text, flags=re.M):
        assert name in attention.__all__, name


def test_module_doctests():
    import doctest

    import sparseforge.attention.cache as cache
    import sparseforge.attention.interface as interface
    import sparseforge.attention.memory as memory
    import sparseforge.attention.policies as policies
    import sparseforge.attention.rope as rope
    import sparseforge.attention.speed as speed
    import sparseforge.ops.decode_attention as ops
    import sparseforge.ops.quest_attention as quest_ops

    for module in (cache, interface, memory, policies, rope, speed, ops, quest_ops):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__

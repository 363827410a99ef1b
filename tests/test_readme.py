"""The README's Python example runs as written (docs must not drift from the code)."""

import re
import shlex
from pathlib import Path

import pytest

import transformers  # noqa: F401  (test dependency: missing means failure)
README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_exactly_two_setup_commands_on_first_screen():
    first_screen = README.read_text().split("---")[0]
    bash = re.findall(r"```bash\n(.*?)```", first_screen, flags=re.S)
    commands = [l for b in bash for l in b.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks():  # in order, sharing names, as a reader would paste them
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "sparsegpt 2:4" in out
    assert (tmp_path / "pruned-2of4" / "config.json").exists()
    from sparseforge.nn import SparseLinear

    assert sum(isinstance(m, SparseLinear) for m in namespace["model"].modules()) == 42  # every pruned layer


def test_cli_examples_parse():
    from sparseforge.cli import build_parser

    parser = build_parser()
    for line in README.read_text().splitlines():
        if line.startswith("sparseforge "):
            argv = shlex.split(line.split("#")[0])[1:]
            parser.parse_args(argv)  # exits (SystemExit) if an example uses an unknown flag

"""CI's skip policy (tests/conftest.py): a skip not on tests/allowed_skips.txt fails a strict run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, reason: str, strict: bool, workers: int = 0) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "allowed_skips.txt"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "test_one.py").write_text(f"import pytest\n\ndef test_it():\n    pytest.skip({reason!r})\n")
    env = {**os.environ, "SPARSEFORGE_STRICT_SKIPS": "1" if strict else "0"}
    xdist = ["-n", str(workers)] if workers else []
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip


@pytest.mark.parametrize(("reason", "strict", "code"), [
    ("transformers is not installed", True, 1),   # a missing dependency must fail CI
    ("transformers is not installed", False, 0),  # locally it is only reported
    ("CPU lacks avx512", True, 0),                # a CPU fact on the allow-list
])  # fmt: skip
def test_unexpected_skip_fails_strict_runs(tmp_path, reason, strict, code):
    proc = run_pytest(tmp_path, reason, strict)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("skips not on tests/allowed_skips.txt" in proc.stdout) == (reason.startswith("transformers"))


@pytest.mark.parametrize(("reason", "code"), [("transformers is not installed", 1), ("CPU lacks avx512", 0)])
def test_the_policy_holds_with_parallel_workers(tmp_path, reason, code):
    # make test runs pytest-xdist workers: the controller sees every worker's skips
    proc = run_pytest(tmp_path, reason, strict=True, workers=2)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("skips not on tests/allowed_skips.txt" in proc.stdout) == (code == 1)

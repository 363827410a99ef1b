"""No module of ours may share its top-level name with a module importable from outside the repo.

A script run as ``python benchmarks/bench_x.py`` puts ``benchmarks/`` first on ``sys.path`` (and pytest
puts each test folder there), so a file ``benchmarks/kernels.py`` hid the PyPI distribution
``kernels`` that transformers imports. This test asks a clean interpreter, started outside the repo,
which top-level names it can import, and fails on any overlap with our script and helper modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# folders whose modules run with the folder itself on sys.path (scripts, pytest's rootdir-relative imports)
SCRIPT_DIRS = ["benchmarks", "scripts", "tests"]
OWN_PACKAGES = {"sparseforge"}


def our_top_level_names() -> dict[str, Path]:
    names: dict[str, Path] = {}
    for folder in SCRIPT_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            if "results" not in path.parts and path.stem != "__init__":
                names.setdefault(path.stem, path)
    for path in (REPO / "src").iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            names.setdefault(path.name, path)
    return names


def importable_from_outside(names: list[str]) -> dict[str, str]:
    """Which of ``names`` a fresh interpreter (cwd outside the repo, no PYTHONPATH) can find, and where."""
    code = (
        "import importlib.util, json, sys\n"
        "found = {}\n"
        "for n in json.loads(sys.argv[1]):\n"
        "    spec = importlib.util.find_spec(n)\n"
        "    if spec is not None: found[n] = str(spec.origin)\n"
        "print(json.dumps(found))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                         check=True, cwd="/", env=env)  # fmt: skip
    return json.loads(out.stdout)


def test_no_module_of_ours_shadows_an_installed_module():
    ours = our_top_level_names()
    found = importable_from_outside(sorted(ours))
    clashes = {n: origin for n, origin in found.items() if n not in OWN_PACKAGES}
    assert not clashes, "rename these modules of ours, they hide installed ones: " + ", ".join(
        f"{ours[n].relative_to(REPO)} hides {origin}" for n, origin in sorted(clashes.items())
    )


def test_the_check_sees_a_real_clash():
    """The probe finds installed names (``json``) and only those."""
    found = importable_from_outside(["json", "surely_not_a_module_name_xyz"])
    assert "json" in found and "surely_not_a_module_name_xyz" not in found


def test_benchmark_scripts_share_one_prefix():
    """Every module in benchmarks/ is ``bench_*``: a future PyPI package cannot collide with it by accident."""
    stray = [p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("bench_")]
    assert not stray, f"rename to bench_*.py: {stray}"


def test_own_package_resolves_to_this_repo():
    """The test environment runs this checkout's sparseforge (editable install), not another copy."""
    found = importable_from_outside(["sparseforge"])
    assert found.get("sparseforge", "").startswith(str(REPO / "src"))

"""Fixtures shared by the fine-tuning tests."""

import pytest

from sparseforge.cli import main


@pytest.fixture(scope="session")
def pruned_dir(tmp_path_factory):
    """The built-in model pruned 2:4 by magnitude, saved by ``sparseforge prune`` (read-only for the tests)."""
    out = tmp_path_factory.mktemp("ft") / "pruned"
    assert main(["prune", "builtin", "--method", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--no-eval", "--no-progress"]) == 0
    return out

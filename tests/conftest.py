import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings as hypothesis_settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py helpers

# Measured "auto" choices are cached per machine (sparseforge.measure.tuning_cache): the tests use a
# cache of their own, empty at the start of every run, never the user's.
os.environ["SPARSEFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparseforge-test-cache-")

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine

# Property tests: random exploration by default (it finds real edge cases); CI runs with
# HYPOTHESIS_PROFILE=ci (.ci/run), the same examples every time, so a landing is never blocked by a
# new random draw. Rerun a CI failure locally with the same profile.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ALLOWED_SKIPS_FILE = Path(__file__).with_name("allowed_skips.txt")


def allowed_skip_patterns() -> list[re.Pattern]:
    """The regexes of tests/allowed_skips.txt (one a line; ``#`` starts a comment)."""
    lines = (line.split("#", 1)[0].strip() for line in ALLOWED_SKIPS_FILE.read_text().splitlines())
    return [re.compile(line) for line in lines if line]


_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not any(p.search(reason) for p in allowed_skip_patterns()):
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """With SPARSEFORGE_STRICT_SKIPS=1 (CI), a skip that tests/allowed_skips.txt does not allow fails the run."""
    if _unexpected_skips and os.environ.get("SPARSEFORGE_STRICT_SKIPS") == "1":
        session.config._unexpected_skips = list(_unexpected_skips)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unexpected_skips:
        terminalreporter.section("skips not on tests/allowed_skips.txt")
        for line in _unexpected_skips:
            terminalreporter.write_line(line)
        if os.environ.get("SPARSEFORGE_STRICT_SKIPS") == "1":
            terminalreporter.write_line("SPARSEFORGE_STRICT_SKIPS=1: these fail the run; fix the cause or allow-list it")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

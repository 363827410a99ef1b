import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py helpers

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine

# Property tests: random exploration by default (it finds real edge cases, e.g. the OWL round-off of
# session 4); CI runs with HYPOTHESIS_PROFILE=ci (.ci/run), the same examples every time, so a landing
# is never blocked by a new random draw. Rerun a CI failure locally with the same profile.
try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # the [test] extra brings hypothesis; without it the property tests skip
    pass


def pytest_collection_modifyitems(config, items):
    # transformers-dependent tests skip cleanly when the [hf] extra is missing
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

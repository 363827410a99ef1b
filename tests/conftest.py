import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py helpers

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine


def pytest_collection_modifyitems(config, items):
    # transformers-dependent tests skip cleanly when the [hf] extra is missing
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The sparse-training tests run many tiny matmuls: on the shared 2-core machine two intra-op
    # threads spin against other jobs and make them ~100x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

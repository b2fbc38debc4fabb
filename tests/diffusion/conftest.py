"""One intra-op thread for these tests: their tensors are tiny (2-D points, 8x8 latents), so a
second thread only adds synchronisation; on a loaded 2-core machine that made them 10-20x slower."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

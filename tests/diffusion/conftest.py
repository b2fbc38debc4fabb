"""One intra-op thread for these tests: their tensors are tiny (2-D points, 8x8 latents), so a
second thread only adds synchronisation; on a loaded 2-core machine that made them 10-20x slower."""
import pytest


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    yield

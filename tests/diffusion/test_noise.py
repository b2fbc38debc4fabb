"""sgdm.diffusion.noise: the numbers depend only on the generators, whatever device they go to."""
from __future__ import annotations

import pytest
import torch

from sgdm.diffusion.noise import randn


def test_per_sample_cpu_generators_draw_what_each_would_alone():
    gens = [torch.Generator().manual_seed(s) for s in (3, 1, 2)]
    got = randn((3, 2, 4, 4), gens, dtype=torch.float64)
    alone = torch.stack([torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (3, 1, 2)])
    assert got.dtype == torch.float64 and torch.equal(got, alone.double())
    with pytest.raises(ValueError, match="a list of 2 generators for a batch of 3"):
        randn((3, 2), gens[:2])
    with pytest.raises(TypeError, match=r"generator\[1\]: expected a torch.Generator"):
        randn((2, 2), [gens[0], 7])


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True])
def test_cpu_noise_for_the_gpu_is_the_cpu_draw_copied_without_blocking(per_sample):
    def gens():
        return [torch.Generator().manual_seed(s) for s in range(4)] if per_sample else torch.Generator().manual_seed(0)

    cpu = randn((4, 3, 8, 8), gens())
    torch.cuda.set_sync_debug_mode("error")  # a blocking copy from pageable memory raises here
    try:
        gpu = randn((4, 3, 8, 8), gens(), device="cuda", dtype=torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    assert torch.equal(gpu.cpu(), cpu.half())

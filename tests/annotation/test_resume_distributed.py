"""Resuming under torch.distributed (gloo on CPU, two spawned ranks, one spawn for every check):

* head training: both ranks stopped in the same step and run again end with the weights of a
  two-rank run never stopped (rank 0 wrote the checkpoint with both ranks' partner generators;
  rank 0 read it and sent it to rank 1);
* mask assignment: the chunks left are dealt round-robin and rank 0 returns every map, those
  written before read back;
* the kNN partners of head training: each rank computes a share of the rows, all get all of them.
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from sgdm.annotation.config import KMeansConfig, StegoConfig
from tests.launchers import leave_process

from .test_stego_resume import CFG, data


def knn_data():
    return torch.randn(7, 8, generator=torch.Generator().manual_seed(2))  # 4 rows on rank 0, 3 on rank 1


def masks_data():
    return torch.randn(7, 2, 2, 3, generator=torch.Generator().manual_seed(0))


MASK_CFG = StegoConfig(method="kmeans", mask_size=0, batch_size=2)


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from sgdm.annotation import stego as stego_module
    from sgdm.annotation.resume import HeadCheckpoint, MaskChunks
    from sgdm.annotation.stego import Segmenter, knn_partners, segment, train_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = StegoConfig(**CFG)  # 6 images, 3 a rank, batches of 2: 2 steps an epoch, 6 in all

        def run(checkpoint=None):
            generator = torch.Generator().manual_seed(3)
            head = train_head(*data(), cfg, generator, distributed=True, checkpoint=checkpoint)
            return head.state_dict(), generator.get_state()

        reference = run()
        path = os.path.join(out_dir, "head.safetensors")
        real, calls = stego_module.stego_loss, []

        def crash_in_step_5(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        stego_module.stego_loss = crash_in_step_5
        try:
            run(HeadCheckpoint(path, every=3))
        except KeyboardInterrupt:
            pass
        stego_module.stego_loss = real
        messages = []
        resumed = run(HeadCheckpoint(path, every=3, log=messages.append))

        chunks = MaskChunks(os.path.join(out_dir, "masks"), rows=3)
        segmenter = Segmenter(torch.eye(3))
        args = (masks_data(), torch.zeros(7, 3), 3, MASK_CFG, KMeansConfig(), torch.Generator())
        if rank == 0:  # an earlier single-process run that wrote chunk 1 and stopped
            single = segment(*args, segmenter=segmenter, chunks=chunks)
            for c in (0, 2):
                chunks.path(c).unlink()
        dist.barrier()
        real_assign, assigned = Segmenter.assign, []
        Segmenter.assign = lambda self, rows, *a, **k: assigned.append(rows.lo) or real_assign(self, rows, *a, **k)
        gathered = segment(*args, distributed=True, segmenter=segmenter, chunks=chunks)
        Segmenter.assign = real_assign
        partners = knn_partners(knn_data(), 2, block_elements=14, distributed=True)  # blocks of 2 rows
        torch.save({"partners": partners, "reference": reference, "resumed": resumed, "messages": messages, "assigned": assigned,
                    "masks": gathered, "single": single if rank == 0 else None},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_process()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_distributed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine (see test_distributed)
    mp.spawn(worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_resume_head_training_to_the_same_weights(ranks):
    out, results = ranks
    for r, got in enumerate(results):
        (weights, generator), (ref_weights, ref_generator) = got["resumed"], got["reference"]
        for name, value in ref_weights.items():
            assert torch.equal(weights[name], value), (r, name)
        assert torch.equal(generator, ref_generator)
    assert results[0]["messages"] == [f"annotate: resuming STEGO head training at step 3 of 6 from "
                                      f"{out / 'head.safetensors'}"]
    assert results[1]["messages"] == []  # rank 0 alone reads and says it


@pytest.mark.slow
def test_two_ranks_assign_the_chunks_left_and_rank_0_returns_all(ranks):
    _, results = ranks
    assert results[0]["assigned"] == [0] and results[1]["assigned"] == [6]  # chunk 1 (rows 3-5) was read back
    assert torch.equal(results[0]["masks"], results[0]["single"]) and results[1]["masks"] is None


@pytest.mark.slow
def test_two_ranks_share_the_knn_partners(ranks):
    from sgdm.annotation.stego import knn_partners

    expected = knn_partners(knn_data(), 2, block_elements=14)
    assert all(torch.equal(r["partners"], expected) for r in ranks[1])

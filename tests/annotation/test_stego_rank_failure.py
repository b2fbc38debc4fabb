"""Two ranks (gloo on CPU, spawned once for every check): a rank that fails while the STEGO head is fitted
(a training step, rank 0's checkpoint write or read, the kNN partners, rank 0's cluster probe) or while it
assigns masks stops the other one at once with RankFailed naming the failed rank and its error, while the
failed rank raises its own; before, the other rank waited in its next collective until the group's timeout.
After each failure both ranks are still in step: the next fit runs normally."""
import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp

from sgdm.annotation.config import KMeansConfig, StegoConfig
from tests.launchers import leave_process

from .test_stego_resume import CFG, data

TIMEOUT = 60  # seconds: the old code left a rank waiting this long in a collective, then failed (a loaded
# machine must not reach it while the new code runs: the two ranks share its cores)


def _outcome(body) -> str:
    try:
        body()
        return "ran"
    except Exception as err:  # noqa: BLE001 - the test compares each rank's error
        return f"{type(err).__name__}: {err}"


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from sgdm.annotation import stego as stego_module
    from sgdm.annotation.resume import HeadCheckpoint, MaskChunks
    from sgdm.annotation.stego import Segmenter, fit_segmenter, knn_partners, segment, train_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    cfg = StegoConfig(**CFG)  # 6 images, 3 a rank, batches of 2: 2 steps an epoch, 6 in all
    checkpoint = HeadCheckpoint(os.path.join(out_dir, f"head{rank}.safetensors"), every=2)

    def train():
        return train_head(*data(), cfg, torch.Generator().manual_seed(3), distributed=True, checkpoint=checkpoint)

    outcomes = {}
    real_loss, calls = stego_module.stego_loss, []

    def loss_failing_on_rank_1(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise OSError("patch shard unreadable")
        return real_loss(*args, **kwargs)

    stego_module.stego_loss = loss_failing_on_rank_1
    outcomes["step"] = _outcome(train)
    stego_module.stego_loss = real_loss

    real_save = HeadCheckpoint.save

    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    HeadCheckpoint.save = full_disk
    outcomes["write"] = _outcome(train)  # rank 0 alone writes
    HeadCheckpoint.save = real_save

    real_load = HeadCheckpoint.load

    def unreadable(self, *args, **kwargs):
        raise MemoryError("reading the checkpoint")

    HeadCheckpoint.load = unreadable
    outcomes["read"] = _outcome(train)  # rank 0 alone reads
    HeadCheckpoint.load = real_load

    real_topk = torch.Tensor.topk

    def out_of_memory(self, *args, **kwargs):
        if rank == 1:
            raise RuntimeError("out of memory")
        return real_topk(self, *args, **kwargs)

    torch.Tensor.topk = out_of_memory
    outcomes["knn"] = _outcome(lambda: knn_partners(data()[1], 2, distributed=True))
    torch.Tensor.topk = real_topk

    real_kmeans = stego_module.kmeans_from_config

    def probe_fails(*args, **kwargs):
        raise ValueError("too few patches")

    stego_module.kmeans_from_config = probe_fails
    kmeans_cfg, mask_cfg = KMeansConfig(), StegoConfig(method="kmeans", mask_size=0, batch_size=2)
    outcomes["probe"] = _outcome(lambda: fit_segmenter(*data(), 3, cfg, kmeans_cfg, torch.Generator().manual_seed(3),
                                                       distributed=True))
    stego_module.kmeans_from_config = real_kmeans

    real_assign, assigned = Segmenter.assign, []

    def image_gone(self, *args, **kwargs):
        assigned.append(1)
        if rank == 1:
            raise ValueError("image 3 can no longer be read")
        return real_assign(self, *args, **kwargs)

    Segmenter.assign = image_gone
    chunks = MaskChunks(os.path.join(out_dir, f"masks{rank}"), rows=1)  # 7 chunks: 4 on rank 0, 3 on rank 1
    outcomes["masks"] = _outcome(lambda: segment(torch.randn(7, 2, 2, 3), torch.zeros(7, 3), 3, mask_cfg,
                                                 kmeans_cfg, torch.Generator(), distributed=True,
                                                 segmenter=Segmenter(torch.eye(3)), chunks=chunks))
    outcomes["masks assigned"] = len(assigned)
    Segmenter.assign = real_assign

    head = train_head(*data(), cfg, torch.Generator().manual_seed(3), distributed=True)  # still in step
    torch.save({"outcomes": outcomes, "head": head.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    leave_process()


@pytest.mark.slow
def test_a_rank_failing_in_head_fitting_or_mask_assignment_stops_the_other_at_once(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    (a, b) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    failed = {"step": 1, "write": 0, "read": 0, "knn": 1, "probe": 0, "masks": 1}
    errors = {"step": "OSError: patch shard unreadable", "write": "OSError: No space left on device",
              "read": "MemoryError: reading the checkpoint", "knn": "RuntimeError: out of memory",
              "probe": "ValueError: too few patches", "masks": "ValueError: image 3 can no longer be read"}
    what = {"step": "training the STEGO head", "write": "training the STEGO head",
            "read": "reading the STEGO head checkpoint", "knn": "finding the STEGO head's kNN partners",
            "probe": "fitting the cluster probe", "masks": "assigning masks"}
    for check, rank in failed.items():
        own, other = (a, b)[rank]["outcomes"][check], (b, a)[rank]["outcomes"][check]
        assert own == errors[check], (check, own)
        assert other == (f"RankFailed: annotate: another rank failed {what[check]}: rank {rank} of 2 raised "
                         f"{errors[check]}; this one stops too"), (check, other)
    assert a["outcomes"]["masks assigned"] == 1  # its first chunk: it did not go on to its other three
    for name, value in a["head"].items():
        assert torch.equal(value, b["head"][name])

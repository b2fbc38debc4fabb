"""data.on_bad_image: skip, when a rank's slice of a micro-batch (or a whole step) has no readable image.

A global micro-batch is cut into rank slices; a slice of only unreadable files used to make that rank's
collate raise while the other ranks went on into the step's collectives (with gloo they crashed with
"Connection closed by peer", with NCCL they wait for the timeout), although one process trains on the
same global micro-batch without complaint."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from sgdm.config.core import from_dict
from sgdm.config.schema import ExperimentConfig
from sgdm.training.data_order import DataOrder
from tests.training.helpers import cli_command, load_checkpoint, run_in_process, tiny_config, write_config

ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}
NUM_IMAGES = 8


def _folder_config(tmp_path, name: str, bad_slots: list[int], **train) -> dict:
    """An 8-image folder whose images at ``bad_slots`` of global micro-batch 0 (4 images) are cut short."""
    from sgdm.data import build_dataset
    from tests.data import fixtures

    root = tmp_path / f"imgs-{name}"
    root.mkdir()
    for i in range(NUM_IMAGES):
        (root / f"img_{i:02d}.png").write_bytes(fixtures.encode(fixtures.sample_rgb(40, 32, seed=i), "PNG"))
    cfg = tiny_config(tmp_path, run={"name": name},
                      data={"dataset": "image_folder", "root": str(root), "on_bad_image": "skip", "flip": False},
                      model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0}},
                      train={"batch_size": 4, "max_steps": 3, "checkpoint_every": 3, **train})
    parsed = from_dict(ExperimentConfig, cfg)
    ids = build_dataset(parsed.data, train=True).ids
    micro = 4 // parsed.train.accumulate
    first = DataOrder(NUM_IMAGES, micro, parsed.run.seed, False).batch(0)
    for slot in bad_slots:
        (root / ids[first[slot][0]]).write_bytes(b"\x89PNG\r\n")  # cut short
    return cfg


def _checkpoint(cfg: dict, step: int) -> dict:
    return load_checkpoint(tmp_run(cfg) / "checkpoints" / f"step-{step:08d}.ckpt")


def tmp_run(cfg: dict):
    import pathlib

    return pathlib.Path(cfg["run"]["dir"]) / cfg["run"]["name"]


def _one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_an_empty_micro_batch_gives_every_parameter_a_zero_gradient(tmp_path):
    """The rank with nothing readable still takes part in DDP's gradient all-reduce (every parameter's hook
    fires) and adds nothing: every readable sample weighs 1 / batch_size wherever it was read."""
    from sgdm.training.data import collate_training, flip_image_sample
    from sgdm.training.data_order import PositionedDataset
    from tests.training.test_internals import _bare_module

    module = _bare_module(tmp_path)
    unreadable = PositionedDataset([None, None], flip_image_sample)
    batch = collate_training([unreadable[(5, 2, 0, False)], unreadable[(5, 3, 1, True)]])
    assert int(batch["position"][0]) == 5 and len(batch["slot"]) == 0 and batch["id"] == []
    module.unet.zero_grad(set_to_none=True)
    module.training_step(batch, 0)
    grads = [p.grad for p in module.unet.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_a_micro_batch_without_a_readable_image_is_left_out_of_its_step(tmp_path):
    """accumulate 2: micro-batch 0 (2 images) is all unreadable, micro-batch 1 of the same step is not; one
    process trained the step on micro-batch 1 (it used to stop: the collate raised)."""
    cfg = _folder_config(tmp_path, "micro", [0, 1], accumulate=2)
    assert _one_thread(lambda: run_in_process(cfg)) == 0
    assert _checkpoint(cfg, 3)["sgdm"]["ema_updates"] == 3


def test_a_step_without_a_readable_image_stops_with_an_error_naming_it(tmp_path):
    cfg = _folder_config(tmp_path, "empty-step", [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match=r"optimiser step 0 .*no readable image.*data.on_bad_image.*validate-data"):
        _one_thread(lambda: run_in_process(cfg))


def _ddp(tmp_path, cfg: dict, command: str = "train") -> subprocess.CompletedProcess:
    ddp = {**cfg, "train": {**cfg["train"], "devices": 2, "strategy": "ddp"}}
    return subprocess.run(cli_command(write_config(tmp_path, ddp, f"{cfg['run']['name']}.yaml"), command=command),
                          env=ENV, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("accumulate, bad", [(1, [0, 1]), (2, [0])])
def test_ddp_with_one_rank_s_slice_unreadable_matches_one_process(tmp_path, accumulate, bad):
    """Global micro-batch 0: rank 0's slice is unreadable, rank 1's is not. Two processes train as one does on
    the same global batch (they used to crash: rank 0's collate raised). accumulate 2: the empty slice is
    the step's first micro-batch, whose gradients stay local (no_sync)."""
    single = _folder_config(tmp_path, "slice-one", bad, accumulate=accumulate)
    assert _one_thread(lambda: run_in_process(single)) == 0
    ddp = _folder_config(tmp_path, "slice-ddp", bad, accumulate=accumulate)
    proc = _ddp(tmp_path, ddp)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = _checkpoint(single, 3), _checkpoint(ddp, 3)
    assert a["sgdm"] == b["sgdm"]
    for key, value in a["state_dict"].items():  # as test_ddp: only the order of float sums differs
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_ddp_step_without_a_readable_image_stops_every_rank_with_the_error(tmp_path):
    proc = _ddp(tmp_path, _folder_config(tmp_path, "empty-ddp", [0, 1, 2, 3]))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Connection closed by peer" not in output, output[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: optimiser step 0" in output, output[-3000:]


def _autoencoder_config(tmp_path, name: str, bad_slots: list[int], disc_start: int = 1, **train) -> dict:
    cfg = _folder_config(tmp_path, name, bad_slots, **train)
    cfg["model"]["autoencoder"].update({"checkpoint": str(tmp_path / f"{name}.ckpt"),
                                        "loss": {"perceptual_weight": 0.0, "disc_start": disc_start}})
    return cfg


def test_the_autoencoder_leaves_out_a_micro_batch_without_a_readable_image(tmp_path):
    """train-autoencoder, accumulate 2, micro-batch 0 all unreadable (it used to raise a KeyError on the
    empty batch, and before that the collate's error)."""
    from sgdm.training.autoencoder import train_autoencoder

    cfg = _autoencoder_config(tmp_path, "ae-micro", [0, 1], accumulate=2)
    assert _one_thread(lambda: train_autoencoder(from_dict(ExperimentConfig, cfg))) == 0
    assert _checkpoint(cfg, 3)["sgdm"] == {"step": 3}


def test_the_autoencoder_stops_on_a_step_without_a_readable_image_naming_it(tmp_path):
    from sgdm.training.autoencoder import train_autoencoder

    cfg = _autoencoder_config(tmp_path, "ae-empty", [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match=r"optimiser step 0 .*no readable image.*data.on_bad_image"):
        _one_thread(lambda: train_autoencoder(from_dict(ExperimentConfig, cfg)))


def test_the_autoencoder_under_ddp_with_one_rank_s_slice_unreadable_trains(tmp_path):
    """Rank 0's slice of micro-batch 0 is unreadable: both ranks take the step (the discriminator's too:
    active from step 0), and a step with nothing readable on any rank stops both with the error."""
    ddp = _autoencoder_config(tmp_path, "ae-slice-ddp", [0, 1], disc_start=0)
    proc = _ddp(tmp_path, ddp, "train-autoencoder")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _checkpoint(ddp, 3)["sgdm"] == {"step": 3}
    proc = _ddp(tmp_path, _autoencoder_config(tmp_path, "ae-empty-ddp", [0, 1, 2, 3]), "train-autoencoder")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Connection closed by peer" not in output, output[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: optimiser step 0" in output, output[-3000:]

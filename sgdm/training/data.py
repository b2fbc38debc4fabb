"""Training data: the dataset (images, or cached latents) in the deterministic order of
:mod:`sgdm.training.data_order`, as a DataLoader Lightning can restart at any position."""
from __future__ import annotations

import dataclasses
from typing import Callable, Union

import torch
from torch.utils.data import DataLoader, Dataset

from sgdm.training.data_order import DataOrder, PositionedDataset, PositionSampler, Unreadable

__all__ = ["flip_image_sample", "collate_training", "is_empty", "no_readable_image", "build_train_loader",
           "build_image_dataset", "PositionLoader", "ignore_sigterm", "ignore_stop_signals", "HostBatchKeys"]

_KEEP = ("image", "mean", "logvar")


def flip_image_sample(sample: dict) -> dict:
    """Horizontal flip of the image only (annotations are mirrored when conditions are built)."""
    return {**sample, "image": sample["image"].flip(-1)}


def collate_training(samples: list[Union[dict, Unreadable, None]]) -> dict:
    """Stack what training uses: image or (mean, logvar), id, flipped, position, slot. Unreadable samples
    (:class:`~sgdm.training.data_order.Unreadable`, or None) drop; the others keep their slots in the global
    micro-batch (their noise rows). A slice with none readable gives an empty batch (no image, no slot)
    whose ``position`` holds the micro-batch's position once: under DDP its rank must still take part in
    the step, adding nothing (the trainers handle it; :func:`is_empty`)."""
    kept = [s for s in samples if isinstance(s, dict)]
    if not kept:
        where = next((s for s in samples if isinstance(s, Unreadable)), None)
        if where is None:
            raise RuntimeError("every sample of a training micro-batch was unreadable (data.on_bad_image: skip); "
                               "run `sgdm-ldm validate-data` on this dataset")
        return {"id": [], "flipped": torch.zeros(0, dtype=torch.bool),
                "position": torch.tensor([where.position], dtype=torch.long), "slot": torch.zeros(0, dtype=torch.long)}
    out = {k: torch.stack([s[k] for s in kept]) for k in _KEEP if k in kept[0]}
    out["id"] = [str(s["id"]) for s in kept]
    out["flipped"] = torch.tensor([bool(s["flipped"]) for s in kept])
    for key in ("position", "slot"):
        out[key] = torch.tensor([int(s[key]) for s in kept], dtype=torch.long)
    return out


def is_empty(batch: dict) -> bool:
    """Whether a training batch of :func:`collate_training` holds no readable sample."""
    return len(batch["slot"]) == 0


def no_readable_image(step: int, accumulate: int) -> RuntimeError:
    """The error both trainers stop with, on every rank together, at an optimiser step none of whose
    images (on any rank) could be read."""
    first = step * accumulate
    return RuntimeError(f"optimiser step {step} (micro-batch positions {first}..{first + accumulate - 1}) has no "
                        f"readable image: all of its images were unreadable (data.on_bad_image: skip); run "
                        f"`sgdm-ldm validate-data` on this dataset")


# what the training steps read as Python values or use to index draws made on the CPU
_HOST_KEYS = ("position", "slot", "flipped")


class HostBatchKeys:
    """Lightning-module mixin: a training batch goes to the device except ``position``, ``slot`` and
    ``flipped``, which stay on the CPU. The steps read them as Python values or index CPU draws with them
    (``int(position[0])``, the rows of the noise, the flips of the condition builders); on a GPU each such
    read would wait for all queued work."""

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        host = {k: batch[k] for k in _HOST_KEYS if k in batch}
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in host}, device,
                                                 dataloader_idx)
        return {**moved, **host}


def build_image_dataset(data_cfg, seed: int) -> Dataset:
    """The training images, unflipped (the trainer decides flips from (seed, epoch))."""
    from sgdm.data import build_dataset

    return build_dataset(dataclasses.replace(data_cfg, flip=False), train=True, seed=seed)


def ignore_sigterm(worker_id: int) -> None:
    """``worker_init_fn``: a DataLoader worker ignores SIGTERM. torchrun's agent (``os.killpg``) and SLURM
    at a time limit send it to every process of a task, workers included; a worker that died of it would
    make the main process raise ("DataLoader worker ... is killed by signal: Terminated") before the
    checkpoint that SIGTERM asks for (:class:`~sgdm.training.callbacks.StepCheckpoint`). Workers still end
    with their loader, and on their own when the main process is gone (PyTorch's worker watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: :func:`ignore_sigterm`, and SIGINT too: a terminal's
    Ctrl+C goes to the whole foreground process group, and a worker ends on it ("DataLoader worker ...
    exited unexpectedly" in the main process, before the checkpoint Ctrl+C asks for)."""
    import signal

    ignore_sigterm(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PositionLoader(DataLoader):
    """A DataLoader that is resumable by construction: where it starts is the module's restored
    step (read by :class:`PositionSampler` at ``iter``), so its own state is empty. Having
    ``state_dict`` tells Lightning it may resume mid-epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_train_loader(dataset: Dataset, flip_fn: Callable[[dict], dict], *, global_micro_batch: int,
                       total_positions: int, seed: int, flip: bool, rank: int, world_size: int,
                       start: Callable[[], int], num_workers: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader over positions ``start() .. total_positions - 1`` of this rank's slices;
    ``pin_memory`` for training on a GPU (page-locked batches copy to it without waiting)."""
    order = DataOrder(len(dataset), global_micro_batch, seed, flip)
    sampler = PositionSampler(order, total_positions, rank, world_size, start)
    return PositionLoader(PositionedDataset(dataset, flip_fn), batch_sampler=sampler, collate_fn=collate_training,
                          num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
                          worker_init_fn=ignore_stop_signals if num_workers else None)

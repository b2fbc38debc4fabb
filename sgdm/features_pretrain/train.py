"""Train a timm backbone with DINO on unlabeled images and save it in timm's layout.

The saved file holds the *teacher* backbone's ``state_dict`` exactly as
``timm.create_model(name, num_classes=0, **kwargs)`` names it (no head), as
``.safetensors`` (with ``architecture``, ``backbone_kwargs`` and the
``pretrain`` settings in the metadata) or ``.pth``, so ``annotate`` loads it
like any timm backbone: ``backbone: <name>``, ``backbone_kwargs: {...}``,
``weights: PATH``. :func:`pretrain_record_differs` compares a saved encoder's
record with the settings that would make it now.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from sgdm.config.core import ConfigError
from sgdm.features_pretrain.augment import crop_sides, multi_crop
from sgdm.features_pretrain.config import PretrainConfig
from sgdm.devices import resolve_device
from sgdm.features_pretrain.dino import DINOHead, clip_grad_per_parameter_, dino_loss, ema_update, update_center
from sgdm.training.data import ignore_sigterm
from sgdm.training.rng import seeded_cpu_rng

__all__ = ["build_backbone", "pretrain_features", "save_backbone", "PretrainStopped"]


class PretrainStopped(Exception):
    """Pretraining stopped by SIGTERM once its checkpoint was written: the same command continues it from ``step``."""

    def __init__(self, step: int, steps: int, checkpoint: pathlib.Path):
        super().__init__(f"pretrain-features: stopped by SIGTERM at step {step}/{steps}; wrote {checkpoint}, from "
                         "which the same command continues")
        self.step, self.checkpoint = step, checkpoint


def build_backbone(name: str, kwargs: dict | None = None, dynamic_size: bool = False) -> nn.Module:
    """timm model ``name`` without classifier (``num_classes=0``) and random weights.

    ``dynamic_size`` lets a ViT take the smaller local crops (position
    embeddings interpolated); it does not change the parameters.
    """
    import timm

    kwargs = dict(kwargs or {})
    if not timm.is_model(name):
        raise ValueError(f"backbone: unknown timm architecture {name!r}")
    if dynamic_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
        except TypeError:
            pass  # not a ViT: convolutional backbones take any size
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


# Pretraining settings that do not change the encoder a run produces.
_RECORD_IGNORES = {"device", "checkpoint_every"}


def _pretrain_record(cfg: PretrainConfig) -> dict:
    from sgdm.config.core import to_dict

    return {k: v for k, v in to_dict(cfg).items() if k not in _RECORD_IGNORES}


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")  # the files save_backbone writes (and load_backbone reads)


def save_backbone(model: nn.Module, path: str | os.PathLike, name: str, kwargs: dict,
                  pretrain: PretrainConfig | None = None, data: dict | None = None) -> pathlib.Path:
    """Write ``model.state_dict()`` atomically (tmp file, fsync, rename) as .safetensors or .pth;
    a .safetensors file records ``name``, ``kwargs``, the ``pretrain`` settings and the ``data``
    it was pretrained on (:func:`sgdm.annotation.annotate.data_settings`)."""
    from sgdm.atomic import atomic_path, atomic_torch_save

    path = pathlib.Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"architecture": name, "backbone_kwargs": json.dumps(kwargs), "format": "timm"}
        if pretrain is not None:
            metadata["pretrain"] = json.dumps(_pretrain_record(pretrain))
        if data is not None:
            metadata["data"] = json.dumps(data)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=metadata)
    elif path.suffix in WEIGHT_SUFFIXES:
        atomic_torch_save(state, path)
    else:
        raise ValueError(f"weights path {path}: expected a .safetensors or .pth file name")
    return path


def _schedules(cfg: PretrainConfig, step: int) -> tuple[float, float]:
    """(learning rate, teacher momentum): linear warm-up then cosine; momentum cosine to 1."""
    if step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    m = 1 - (1 - cfg.teacher_momentum) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))
    return lr, m


def _weight_decay(cfg: PretrainConfig, step: int) -> float:
    """Weight decay at ``step``: ``weight_decay``, or a cosine from it (step 0) to ``weight_decay_end``
    (the last step)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    progress = step / max(1, cfg.steps - 1)
    return cfg.weight_decay_end + (cfg.weight_decay - cfg.weight_decay_end) * 0.5 * (1 + math.cos(math.pi * progress))


def _teacher_temp(cfg: PretrainConfig, step: int) -> float:
    """Teacher temperature at ``step``: linear from ``warmup_teacher_temp`` (step 0) to ``teacher_temp``
    (step ``warmup_teacher_temp_steps - 1``), then ``teacher_temp``."""
    n = cfg.warmup_teacher_temp_steps
    if cfg.warmup_teacher_temp is None or step >= n:
        return cfg.teacher_temp
    if n == 1:
        return cfg.warmup_teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / (n - 1)


def _param_groups(model: nn.Module, cfg: PretrainConfig) -> list[dict]:
    """The optimiser's parameter groups; the first is the one whose weight decay is scheduled.

    ``decay_bias_and_norm``: one group with every trainable parameter (sgdm's earlier optimiser);
    otherwise DINO's split, biases and 1-D tensors (norm gains and shifts) in a second group
    without weight decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.decay_bias_and_norm:
        return [{"params": [p for _, p in named]}]
    plain = [p for n, p in named if n.endswith(".bias") or p.ndim <= 1]
    plain_ids = {id(p) for p in plain}
    return [{"params": [p for _, p in named if id(p) not in plain_ids]}, {"params": plain, "weight_decay": 0.0}]


def _stack_images(items: list) -> torch.Tensor | None:
    # Only the image is needed; a dataset that skips bad files yields None for them (None: all were).
    images = [item["image"] for item in items if item is not None]
    return torch.stack(images) if images else None


class _Batches:
    """Batches of images, epoch after epoch, each epoch in the order of a permutation drawn from
    ``generator`` in this process when its first batch is asked for (``num_workers`` processes only read
    the images, so the batches and the generator's stream do not depend on them). :meth:`state` (the
    epoch's order, how many of its batches were taken and how many held an image) continues it exactly."""

    def __init__(self, dataset: Dataset, cfg: PretrainConfig, generator: torch.Generator, num_workers: int = 0,
                 state: dict | None = None, workers_ignore_sigterm: bool = False):
        self.n = len(dataset)
        if self.n < cfg.batch_size:
            raise ValueError(f"pretrain: the dataset has {self.n} images, fewer than batch_size {cfg.batch_size}")
        self.dataset, self.batch_size, self.generator, self.num_workers = dataset, cfg.batch_size, generator, num_workers
        # workers that ignore SIGTERM (sent to the whole process group) leave the main process to end its step and
        # checkpoint; they must then be shut down by close(): the interpreter's exit would wait for them for ever
        self.worker_init = ignore_sigterm if workers_ignore_sigterm and num_workers else None
        state = state or {"order": None, "taken": 0, "read": 0}
        self.order, self.taken, self.read = state["order"], int(state["taken"]), int(state["read"])
        self._batches = self._epochs()

    def state(self) -> dict:
        return {"order": self.order, "taken": self.taken, "read": self.read}

    def close(self) -> None:
        """Shut the loader's workers down now (multiprocessing's exit handler terminates them with SIGTERM, then
        joins them)."""
        self._batches.close()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._batches)

    def _epochs(self):
        while True:
            if self.order is None:
                # the draws of torch's RandomSampler(generator=generator), which made the order before: one
                # permutation per epoch, and one more, unused, when it is exhausted (so earlier encoders are
                # reproduced)
                self.order, self.taken, self.read = torch.randperm(self.n, generator=self.generator).tolist(), 0, 0
            loader = DataLoader(self.dataset, self.batch_size, sampler=self.order[self.taken * self.batch_size:],
                                drop_last=True, collate_fn=_stack_images, num_workers=self.num_workers,
                                worker_init_fn=self.worker_init)
            for batch in loader:
                self.taken += 1
                if batch is not None:  # a batch of skipped files only is passed over
                    self.read += 1
                    yield batch
            torch.randperm(self.n, generator=self.generator)
            if self.read == 0:  # else the next epoch would find none either, for ever
                raise ValueError(f"pretrain: none of the {self.n} images of the dataset could be read in a whole "
                                 "epoch (every file was skipped as unreadable); `sgdm-ldm validate-data CONFIG` "
                                 "lists them and why")
            self.order = None


def _checkpoint_record(backbone: str, backbone_kwargs: dict, cfg: PretrainConfig, data_record: dict | None) -> dict:
    """What must agree for a checkpoint to continue: every setting that changes the encoder, as JSON text."""
    return {"annotation.backbone": backbone, "annotation.backbone_kwargs": json.dumps(backbone_kwargs, sort_keys=True),
            **{f"prepare.pretrain.{k}": json.dumps(v) for k, v in _pretrain_record(cfg).items()},
            **{f"data.{k}": json.dumps(v, sort_keys=True, default=str) for k, v in (data_record or {}).items()}}


def _load_checkpoint(path: pathlib.Path, record: dict, device: torch.device) -> dict | None:
    """The checkpoint at ``path`` (None when there is none); one of other settings is refused naming them."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        old = state["record"]
    except Exception as err:  # not a checkpoint of pretrain_features (or damaged): say which file, and what to do
        raise ConfigError("prepare.pretrain", f"the checkpoint {path} cannot be read ({type(err).__name__}: "
                                              f"{str(err)[:200]}); delete it to start again") from None
    # a setting added since the checkpoint was written counts at its default (as in pretrain_record_differs)
    defaults = {f"prepare.pretrain.{k}": json.dumps(v) for k, v in _pretrain_record(PretrainConfig()).items()}
    differ = [k for k in sorted(set(old) | set(record)) if old.get(k, defaults.get(k)) != record.get(k)]
    if differ:
        raise ConfigError("prepare.pretrain", f"the checkpoint {path} was written by a pretraining with other "
                                              f"settings ({', '.join(differ)}); delete it to start again")
    return state


@contextlib.contextmanager
def _noting_sigterm(active: bool):
    """For the time of the block (where ``active``, in the main thread), SIGTERM is noted, not obeyed: the list
    yielded gets an entry, so the step in progress ends and writes its checkpoint (a scheduler's time limit or
    preemption sends SIGTERM, then SIGKILL a while later). The handler from before is put back on the way out."""
    noted: list[int] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield noted
        return
    before = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def _check_crop_sides(model: nn.Module, name: str, size: int, cfg: PretrainConfig) -> None:
    """Refuse, before the first step, crops a ViT's patch embedding cannot take: a side that is not a
    multiple of its patch size (timm asserts deep in the forward, naming no setting). A backbone with
    ``dynamic_img_pad`` pads any side, and one without a plain patch embedding (CNNs) takes any."""
    from timm.layers import PatchEmbed

    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, PatchEmbed) or getattr(embed, "dynamic_img_pad", False):
        return
    p = math.lcm(*(int(v) for v in embed.patch_size))
    size, local = crop_sides(size, cfg)
    where = f"a multiple of the patch size {p} of {name!r}"
    if size % p:
        raise ConfigError("data.size", f"global crops of {size} px (the image side) are not {where}; "
                                       f"use e.g. {' or '.join(map(str, sorted({max(p, size // p * p), -(-size // p) * p})))}")
    if cfg.local_crops and local % p:
        sides = sorted({max(p, local // p * p), min(size, -(-local // p) * p)})
        hint = " or ".join(f"{m / size:g} ({m} px)" for m in sides)
        raise ConfigError("prepare.pretrain.local_crop_fraction",
                          f"local crops of {local} px (round({size} * {cfg.local_crop_fraction:g})) are not {where}; "
                          f"use e.g. {hint}")


def pretrain_features(
    dataset: Dataset,
    backbone: str,
    backbone_kwargs: dict,
    cfg: PretrainConfig,
    out_path: str | os.PathLike,
    log: Callable[[str], None] | None = None,
    data_record: dict | None = None,
    on_step: Callable[[int, nn.ModuleDict, torch.optim.Optimizer], None] | None = None,
    num_workers: int = 0,
    checkpoint: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Run ``cfg.steps`` DINO steps on ``dataset`` (dicts with ``image`` in [-1, 1]); save the teacher
    (recording ``data_record``, the data settings behind ``dataset``, when given).

    ``on_step(step, student, optimizer)``, when given, is called after each update (the student
    holds ``backbone`` and ``head``); for tests and monitoring, it must not change them.
    ``num_workers``: DataLoader processes that read the images (``data.num_workers``); the result does not
    depend on it. ``checkpoint``: where a checkpoint is written every ``cfg.checkpoint_every`` steps; when one
    is there (of the same settings) training continues from it, to the encoder an uninterrupted run makes,
    and the finished run deletes it. With a checkpoint, a SIGTERM ends the step in progress, writes the checkpoint and
    raises :class:`PretrainStopped` (``sgdm-ldm pretrain-features`` exits 143, as ``train`` does)."""
    device = resolve_device(cfg.device, "prepare.pretrain.device")
    generator = torch.Generator().manual_seed(cfg.seed)
    torch_init = torch.Generator().manual_seed(cfg.seed + 1)
    # timm initialises from the global RNG; keep it ours and local
    with seeded_cpu_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=torch_init))):
        student = build_backbone(backbone, backbone_kwargs, dynamic_size=True)
        head = DINOHead(student.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    student_model = nn.ModuleDict({"backbone": student, "head": head}).to(device)
    teacher_model = copy.deepcopy(student_model).requires_grad_(False)
    center = torch.zeros(1, cfg.out_dim, device=device)
    params = [p for p in student_model.parameters() if p.requires_grad]
    groups = _param_groups(student_model, cfg)
    optimizer = torch.optim.AdamW(groups if len(groups) > 1 else params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    last_layer = [p for p in student_model["head"].last.parameters() if p.requires_grad]
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.time()
    checkpoint = pathlib.Path(checkpoint) if checkpoint is not None else None
    record = _checkpoint_record(backbone, backbone_kwargs, cfg, data_record)
    saved = _load_checkpoint(checkpoint, record, device) if checkpoint is not None else None
    first = 0
    if saved is not None:
        student_model.load_state_dict(saved["student"])
        teacher_model.load_state_dict(saved["teacher"])
        optimizer.load_state_dict(saved["optimizer"])
        center.copy_(saved["center"])
        generator.set_state(saved["generator"].cpu())
        first = int(saved["step"])
        log(f"pretrain-features: continuing from {checkpoint} at step {first + 1}/{cfg.steps}")
    stoppable = checkpoint is not None and cfg.checkpoint_every > 0  # a SIGTERM writes the checkpoint and stops
    batches = _Batches(dataset, cfg, generator, num_workers, None if saved is None else saved["batches"], stoppable)
    with _noting_sigterm(stoppable) as sigterm, contextlib.closing(batches):
        for step in range(first, cfg.steps):
            lr, momentum = _schedules(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.weight_decay_end is not None:
                optimizer.param_groups[0]["weight_decay"] = _weight_decay(cfg, step)
            images = next(batches).to(device)
            if step == first:
                _check_crop_sides(student, backbone, images.shape[-1], cfg)
            global_views, local_views = multi_crop(images, cfg, generator)
            with torch.no_grad():
                teacher_out = [teacher_model["head"](teacher_model["backbone"](v)) for v in global_views]
            student_out = [student_model["head"](student_model["backbone"](v)) for v in global_views + local_views]
            loss = dino_loss(student_out, teacher_out, center, cfg.student_temp, _teacher_temp(cfg, step))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretrain: non-finite DINO loss at step {step}; lower lr ({cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < cfg.freeze_last_layer_steps:
                for p in last_layer:
                    p.grad = None  # AdamW skips a parameter without a gradient: no step, no decay
            if cfg.clip_grad is not None:
                if cfg.clip_grad_scope == "per_parameter":
                    clip_grad_per_parameter_(params, cfg.clip_grad)
                else:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            ema_update(teacher_model, student_model, momentum)
            update_center(center, teacher_out, cfg.center_momentum)
            stop = bool(sigterm) and step + 1 < cfg.steps  # noted once: a SIGTERM from here on stops the next step
            if checkpoint is not None and cfg.checkpoint_every and step + 1 < cfg.steps \
                    and ((step + 1) % cfg.checkpoint_every == 0 or stop):
                from sgdm.training.checkpoint import atomic_torch_save

                atomic_torch_save({"step": step + 1, "student": student_model.state_dict(),
                                   "teacher": teacher_model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "center": center, "generator": generator.get_state(),
                                   "batches": batches.state(), "record": record}, checkpoint)
            if on_step is not None:
                on_step(step, student_model, optimizer)
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                log(f"pretrain-features step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
            if stop:  # (after the last step the run finishes)
                raise PretrainStopped(step + 1, cfg.steps, checkpoint)
    path = save_backbone(teacher_model["backbone"], out_path, backbone, backbone_kwargs, pretrain=cfg,
                         data=data_record)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return path


def pretrain_record_differs(path: str | os.PathLike, backbone: str, backbone_kwargs: dict,
                            cfg: PretrainConfig, data_record: dict | None = None) -> list[str] | None:
    """Keys (``annotation.backbone``, ``annotation.backbone_kwargs``, ``prepare.pretrain.<key>``,
    ``data.<key>`` of ``data_record``) whose values differ from those the encoder at ``path`` was
    pretrained with; None when the file holds no record (a .pth, an encoder made elsewhere or by an
    older sgdm). The data are compared where the file records them (sgdm after 2026-11-26)."""
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "pretrain" not in meta:
        return None
    def plain(value):  # as it reads back from the JSON metadata (tuples become lists)
        return json.loads(json.dumps(value))

    differ = []
    if meta.get("architecture") != backbone:
        differ.append("annotation.backbone")
    if json.loads(meta.get("backbone_kwargs", "{}")) != plain(backbone_kwargs):
        differ.append("annotation.backbone_kwargs")
    old, new = json.loads(meta["pretrain"]), plain(_pretrain_record(cfg))
    default = plain(_pretrain_record(PretrainConfig()))  # keys added since count at their defaults
    differ += [f"prepare.pretrain.{k}" for k in sorted(set(old) | set(new))
               if old.get(k, default.get(k)) != new.get(k, default.get(k))]
    if data_record is not None and "data" in meta:
        old_data, new_data = json.loads(meta["data"]), plain(data_record)
        differ += [k for k in sorted(set(old_data) | set(new_data)) if old_data.get(k) != new_data.get(k)]
    return differ

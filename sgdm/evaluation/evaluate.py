"""``evaluate_run``: sample a trained run with its EMA weights and measure it.

Steps: load the run's resolved config and exported EMA pipeline; draw N
conditions from the training annotations; for each guidance scale w (one, or
the sweep) sample N images and compute the requested metrics against the
reference set (training images, unflipped); write ``eval/results.json``,
``eval/results.md`` and, for a sweep, ``eval/sweep.png`` in the run directory.
Everything that can fail before sampling (weights files, run layout) is
checked first.

Several processes (``torchrun`` or ``srun``, :func:`sgdm.launch.join_process_group`; or any
initialised ``torch.distributed`` group whose every rank calls :func:`evaluate_run`) share the
sampling: every rank draws the same conditions and per-image generators and samples one contiguous
run of whole batches (:func:`~sgdm.evaluation.ranks.share`), so each image is the one a single process makes, in the same
batch. The other ranks hand their samples to rank 0 through files (:class:`~sgdm.evaluation.ranks.Shares`), and rank 0
alone measures, logs and writes the results, exactly as one process does.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from sgdm.annotation.features import BackboneError, BackboneKeys, extraction_precision
from sgdm.config.core import ConfigError, to_dict
from sgdm.data.config import recorded_data
from sgdm.evaluation.conditions import EvalConditions, draw_conditions
from sgdm.evaluation.config import EvalConfig
from sgdm.evaluation.ranks import Shares, agree, process_device, share
from sgdm.evaluation.store_checks import check_store, check_store_extractor  # noqa: F401 (check_store_extractor: public here)
from sgdm.launch import rank_world

__all__ = ["evaluate_run", "load_run", "load_run_weights", "recorded_eval", "generate", "to_uint8", "write_results", "check_store_extractor"]

INCEPTION = ("fid", "is", "kid")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def load_run(run_dir: str | pathlib.Path, device: str | torch.device | None = None):
    """(ExperimentConfig, SelfGuidedPipeline with EMA weights on ``device``) of a training run directory.

    The weights files the run's ``eval:`` section names are left out of the returned config (None), unchecked:
    they may be paths of the machine the run was made on, and an evaluation may not read them (another
    metric, a flag's file). :func:`evaluate_run` reads that section itself (:func:`recorded_eval`)."""
    cfg, pipe, _ = load_run_weights(run_dir, device)
    return cfg, pipe


def load_run_weights(run_dir: str | pathlib.Path, device: str | torch.device | None = None):
    """:func:`load_run`'s (config, pipeline) and where the weights came from: ``{"file": the checkpoint or
    the exported pipeline/, "step": the training step they are of (None: an export that does not record it)}``."""
    from sgdm.config.schema import load_recorded

    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"RUN {run_dir}: no config.yaml there; pass a training run directory (run.dir/run.name)")
    from sgdm.training.export import _export_step, checkpoint_for, pipeline_from_checkpoint

    cfg = load_recorded(run_dir / "config.yaml")
    pipeline_dir = run_dir / "pipeline"
    # the weights `sgdm-ldm sample` takes: a stopped or running run's newest checkpoint, and that of a run
    # continued past its export (whose pipeline/ holds the earlier end's weights)
    ckpt = checkpoint_for(run_dir)
    if ckpt is None and not pipeline_dir.exists():
        raise FileNotFoundError(
            f"RUN {run_dir}: no EMA weights ({pipeline_dir} is missing and {run_dir / 'checkpoints'} holds no "
            "valid checkpoint); evaluation uses the EMA weights that training saves"
        )
    if ckpt is not None:
        pipe, step = pipeline_from_checkpoint(ckpt)
        if rank_world()[0] == 0:
            why = "is older" if pipeline_dir.exists() else "is not there"
            _stderr(f"evaluating the EMA weights of {ckpt} (step {step}; the run's exported pipeline/ {why})")
        return cfg, pipe.to(device), {"file": str(ckpt), "step": step}
    from sgdm.pipeline import WEIGHTS_NAME, SelfGuidedPipeline

    pipe = SelfGuidedPipeline.from_pretrained(pipeline_dir, device=device)
    file = pipeline_dir / WEIGHTS_NAME
    return cfg, pipe, {"file": str(pipeline_dir), "step": _export_step(file) if file.is_file() else None}


def recorded_eval(run_dir: str | pathlib.Path) -> EvalConfig:
    """The ``eval:`` section of run ``run_dir``'s config.yaml, validated (the weights files its metrics read
    must exist, :meth:`EvalConfig.check_files`)."""
    from sgdm.config.core import from_dict, load_yaml

    return from_dict(EvalConfig, load_yaml(pathlib.Path(run_dir) / "config.yaml").get("eval") or {}, "eval")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8 (round half up)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_candidates(length: int, n: int) -> Iterator[int]:
    """Dataset indices in the order the reference set takes them: first ``min(n, length)`` items spread
    evenly over the dataset (item ``i * length // n``), so a dataset stored class by class (ImageNet's
    folders, sorted) gives every class its share, then the others in order, to stand in for unreadable ones."""
    m = min(n, length)
    picks = [i * length // m for i in range(m)] if m else []
    yield from picks
    taken = set(picks)
    yield from (i for i in range(length) if i not in taken)


class _Images(Dataset):
    """``(index, image or None)`` of dataset items ``indices``: the image alone goes back from a worker."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor]]:
        item = self.dataset[self.indices[i]]
        return self.indices[i], None if item is None else item["image"]


def _read(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int):
    """``(index, image or None)`` of dataset items ``indices``, in that order, read by ``num_workers``
    DataLoader processes (``data.num_workers``; 0: this one)."""
    batches = -(-len(indices) // batch_size)  # a worker beyond one a batch would only start (a few stand-ins)
    loader = DataLoader(_Images(dataset, indices), batch_size=batch_size, num_workers=min(num_workers, batches),
                        collate_fn=list)
    for batch in loader:
        yield from batch


class _ReferenceImages(Dataset):
    """``n`` readable dataset images spread evenly over it (:func:`reference_candidates`), as [-1, 1]
    tensors or uint8 (for torch-fidelity).

    Unreadable images (``None`` items, ``data.on_bad_image: skip``) are passed over as training
    passes over them, each replaced by the next candidate, so the set keeps its ``n`` images while the
    dataset has that many readable ones. Which dataset item is reference image i (:meth:`rows`) is found
    once, in this process, by reading the candidates with ``num_workers`` DataLoader processes, as many
    at a time as images are missing: exactly the candidates one process reading them in order would
    read. A DataLoader's workers (torch-fidelity's) get copies with the rows known: they do not scan."""

    def __init__(self, dataset: Dataset, n: int, uint8: bool, num_workers: int = 0, batch_size: int = 64,
                 rows: Optional[list[int]] = None):
        self.dataset, self.n, self.uint8 = dataset, min(n, len(dataset)), uint8
        self.num_workers, self.batch_size = num_workers, batch_size
        self._rows = rows  # dataset index of reference image i; None until found

    def __len__(self) -> int:
        return self.n

    def _scan(self) -> Iterator[torch.Tensor]:
        """The reference images [3, H, W] in order, each read once; :meth:`rows` is known after the last."""
        candidates = reference_candidates(len(self.dataset), self.n)
        rows: list[int] = []
        while len(rows) < self.n:
            chunk = list(itertools.islice(candidates, self.n - len(rows)))  # the next ones, as many as are missing
            if not chunk:
                raise ValueError(f"the reference set needs {self.n} readable images (eval.reference_n), but only "
                                 f"{len(rows)} of the dataset's {len(self.dataset)} images can be read; lower "
                                 "eval.reference_n (sgdm-ldm eval --reference-n) or run `sgdm-ldm validate-data` on this config")
            for index, image in _read(self.dataset, chunk, self.batch_size, self.num_workers):
                if image is not None:
                    rows.append(index)
                    yield image
        self._rows = rows

    def rows(self) -> list[int]:
        """The dataset index of each reference image (reads the candidates the first time)."""
        if self._rows is None:
            if get_worker_info() is not None:  # a worker's copy: its scan would be one more of the whole set
                raise RuntimeError("the reference set's rows must be found (rows()) before DataLoader workers copy it")
            for _ in self._scan():
                pass
        return self._rows

    def as_uint8(self) -> "_ReferenceImages":
        """The same set as uint8 images (torch-fidelity's input), with the rows when they are known."""
        return _ReferenceImages(self.dataset, self.n, True, self.num_workers, self.batch_size, self._rows)

    def _image(self, index: int, image: Optional[torch.Tensor]) -> torch.Tensor:
        if image is None:
            raise ValueError(f"reference image {index} (dataset item {self._rows[index]}) cannot be read any more")
        return to_uint8(image) if self.uint8 else image

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.n:
            raise IndexError(f"reference image {index} out of range for {self.n}")
        item = self.dataset[self.rows()[index]]
        return self._image(index, None if item is None else item["image"])

    def batches(self) -> Iterator[torch.Tensor]:
        """[B, 3, H, W] batches (``batch_size``) of the reference images in order, each read once by the
        workers (the first time, the read that finds the rows)."""
        if self._rows is None:
            images = (self._image(i, image) for i, image in enumerate(self._scan()))
        else:
            images = (self._image(i, image)
                      for i, (_, image) in enumerate(_read(self.dataset, self._rows, self.batch_size, self.num_workers)))
        while chunk := list(itertools.islice(images, self.batch_size)):
            yield torch.stack(chunk)


def generate(pipe, conditions: EvalConditions, scale: Optional[float], ecfg: EvalConfig, n: int,
             generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """``n`` images [n, 3, H, W] in [-1, 1] from ``pipe`` at guidance scale ``scale`` (None: unguided).

    ``generators``: one per image (a slice of ``per_image_generators(Generator().manual_seed(eval.seed),
    eval.n)``, for one rank's share); default: the ``n`` that ``eval.seed`` gives, as one process draws them."""
    kwargs = conditions.pipeline_kwargs()
    if scale is not None:
        kwargs["guidance_scale"] = scale
    generator = torch.Generator().manual_seed(ecfg.seed) if generators is None else list(generators)
    images = pipe(
        n, num_steps=ecfg.steps, sampler=ecfg.sampler, eta=ecfg.eta, spacing=ecfg.spacing, generator=generator,
        batch_size=ecfg.batch_size, output_type="pt", progress=False, **kwargs,
    )
    return images.float().cpu() * 2 - 1  # "pt" output is [0, 1]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reference_content(dataset: Dataset, n: int) -> str:
    """Digest of the ids of the ``n`` dataset items the reference set takes (:func:`reference_candidates`)
    and the stamps (size, mtime) of their files
    (:func:`~sgdm.annotation.cache.file_stamps`): the reference statistics' cache name carries it, so an
    image replaced or a list file edited at the same config is measured again, not read from the cache.
    (An unreadable image among them is replaced by a later candidate, which is not stamped.)
    Items without a file of their own (an LMDB's) are covered by the stamp of the database's ``data.mdb``."""
    from sgdm.annotation.cache import file_stamps

    ids = getattr(dataset, "ids", None)
    if ids is None:  # not an sgdm dataset: its config is all there is to key on
        return "no-ids"
    rows = list(itertools.islice(reference_candidates(len(dataset), n), n))
    source = getattr(dataset, "source", None)
    stamps = file_stamps([ids[i] for i in rows], [source(i) if source is not None else "" for i in rows])
    root = getattr(dataset, "root", None)
    if root is not None and (pathlib.Path(root) / "data.mdb").is_file():
        stamps += file_stamps(["data.mdb"], [str(pathlib.Path(root) / "data.mdb")])
    return _digest(stamps)


# how a backbone error names eval's own extractor: the eval: keys, and sgdm-ldm eval's flags that set them
EVAL_FEATURE_KEYS = BackboneKeys("eval.feature_backbone", "eval.feature_backbone_kwargs", "eval.feature_weights",
                                 flags=("--feature-extractor", "--feature-backbone-kwargs", "--feature-weights"))


def _feature_space(cfg, ecfg: EvalConfig):
    from sgdm.evaluation.feature_distance import annotation_space, load_feature_space
    from sgdm.devices import resolve_device

    a = cfg.annotation
    own = bool(ecfg.feature_backbone or ecfg.feature_weights)  # eval's own extractor, not the annotation's
    device = resolve_device(ecfg.device, "eval.device")
    try:
        name = None if ecfg.feature_name is None else ecfg.feature_name.format(dataset=cfg.data.dataset)
        if not own:  # the annotation's extractor as annotate builds it, its input size included
            return annotation_space(a, name, device)
        if ecfg.feature_backbone:
            return load_feature_space(ecfg.feature_backbone, ecfg.feature_weights, ecfg.feature_backbone_kwargs, name,
                                      device, keys=EVAL_FEATURE_KEYS)
        # other weights for the annotation's architecture: built as the annotation builds it
        return load_feature_space(a.backbone, ecfg.feature_weights, dict(a.backbone_kwargs), name, device,
                                  keys=EVAL_FEATURE_KEYS, image_size=a.image_size)
    except BackboneError as err:
        if own:
            raise
        # the run's annotation settings are only the default: say how to choose the distance's own
        raise BackboneError(f"fd: {err}. The distance uses the run's annotation backbone unless it is given an "
                            f"extractor of its own: --feature-extractor NAME --feature-weights FILE "
                            f"(eval.feature_backbone, eval.feature_weights); or leave fd out of --metrics "
                            f"(eval.metrics)") from None


class _Evaluator:
    """Holds what is shared across guidance scales: reference data, extractors, caches."""

    def __init__(self, cfg, ecfg: EvalConfig, run_dir: pathlib.Path, log, autoencoder=None):
        from sgdm.data import build_dataset

        self.cfg, self.ecfg, self.log = cfg, ecfg, log
        self.autoencoder = autoencoder  # the run's first stage: the mask scorer's ceiling for a latent model
        self.cache = ecfg.cache_dir or run_dir / "eval" / "cache"
        wants_inception = any(m in ecfg.metrics for m in INCEPTION)
        if wants_inception:
            from sgdm.evaluation.fidelity import (check_inception_weights, check_inception_weights_load,
                                                  fetch_inception_weights)

            check_inception_weights(ecfg.inception_weights)
            if ecfg.inception_weights is not None:
                check_inception_weights_load(ecfg.inception_weights)
            else:
                fetch_inception_weights()  # torch-fidelity would download them only after sampling
        check_store(cfg, ecfg.metrics, run_dir)
        self.space = _feature_space(cfg, ecfg) if "fd" in ecfg.metrics else None
        self._ann_space = None
        self.cluster_f, self.notes = None, []  # f of the store's cluster ids; why a metric asked for is missing
        self.precision = cfg.annotation.precision  # adherence's extraction: the store's, once it is opened
        kind = cfg.model.guidance.kind
        if "adherence" in ecfg.metrics and kind in ("label", "box", "mask"):
            from sgdm.annotation.centroids import ClusterF
            from sgdm.annotation.store import AnnotationStore
            from sgdm.evaluation.store_checks import (check_feature_dim, check_input_size, missing_cluster_f,
                                                      scored_by_stored_f)

            from sgdm.evaluation.adherence import store_precision

            store = AnnotationStore.open(cfg.annotation.store)
            self.precision = store_precision(store, cfg.annotation.precision)
            missing = missing_cluster_f(cfg)
            if missing is not None:
                self.notes.append(f"no cluster adherence: {missing}")
                log(f"eval: warning: {self.notes[-1]}")
            elif kind in ("label", "box"):
                self.cluster_f = ClusterF.of_store(store)
            if kind != "label" or self.cluster_f is not None:
                # built now: a backbone that cannot load, or one at another input size or feature width than the
                # store's, stops the evaluation before sampling
                backbone = self._annotation_space().backbone
                if scored_by_stored_f(kind, store):
                    check_input_size(cfg, backbone.input_size, run_dir)
                check_feature_dim(cfg, backbone, run_dir)
        self._probe = None  # (LinearProbe, held-out scores) of a ground-truth mask store, see _mask_probe
        self.dataset = build_dataset(cfg.data, train=False)
        self.data_key = _digest(recorded_data(cfg.data))
        if wants_inception or "fd" in ecfg.metrics:  # the images themselves, not only the settings that read them
            self.data_key += "-" + _reference_content(self.dataset, ecfg.reference_n)
        self._ref_stats = None
        # one scan for readable images, shared by fd's statistics and torch-fidelity's uint8 copy
        self._reference = _ReferenceImages(self.dataset, ecfg.reference_n, uint8=False,
                                           num_workers=cfg.data.num_workers, batch_size=ecfg.batch_size)
        self._inception_ref = None

    def reference_stats(self):
        if self._ref_stats is None:
            from sgdm.annotation import cache as feature_cache
            from sgdm.evaluation.feature_distance import reference_stats

            ref = self._reference
            b = self.space.backbone
            # the whole identity of the features: hub names share long prefixes (hub:vit_small_patch16_224.dino,
            # hub:vit_small_patch8_224.dino), backbone_kwargs change the architecture, not the name, and
            # FEATURE_FORMAT changes with what extraction returns for the same weights; the device type
            # decides the precision (extract runs CUDA under bfloat16 autocast), so a CPU evaluation
            # does not measure its fp32 samples against statistics of bf16 features
            backbone_key = _digest([b.name, b.weights_id, b.input_size, b.mean, b.std,
                                    [list(t.shape) for t in b.model.state_dict().values()],
                                    feature_cache.FEATURE_FORMAT, self.space.device.type])
            name = f"fd-{self.space.name}-{self.data_key}-{backbone_key}-n{len(ref)}.pt"
            self._ref_stats = reference_stats(self.space, ref.batches(), self.cache / name)
        return self._ref_stats

    def inception_reference(self) -> _ReferenceImages:
        """The reference set as torch-fidelity reads it (uint8), one for every scale: its scan for readable
        images is done once (by fd's statistics when they read the images first)."""
        if self._inception_ref is None:
            self._inception_ref = self._reference.as_uint8()
        return self._inception_ref

    def check_reference(self) -> None:
        """Before sampling: the reference set can be read (an unreadable one would stop the evaluation after
        every sample was drawn). fd reads it for its statistics; FID and KID read it through torch-fidelity
        after sampling, so it is read here unless torch-fidelity's cache of its features is there."""
        if self.space is not None:
            self.reference_stats()
        if not {"fid", "kid"} & set(self.ecfg.metrics):
            return
        from sgdm.evaluation.fidelity import check_inception_weights

        ref = self.inception_reference()
        tag = check_inception_weights(self.ecfg.inception_weights)
        if any(pathlib.Path(self.cache).glob(f"sgdm-{self.data_key}-n{len(ref)}-{tag}-*")):
            return  # torch-fidelity reads its features, not the images
        ref.rows()  # reads the candidates, passing over unreadable ones

    def measure(self, images: torch.Tensor, conditions: EvalConditions, generator: torch.Generator) -> dict:
        e, out = self.ecfg, {}
        inception = [m for m in e.metrics if m in INCEPTION]
        if inception:
            from sgdm.devices import resolve_device
            from sgdm.evaluation.fidelity import inception_metrics

            ref = self.inception_reference()
            out.update(inception_metrics(to_uint8(images), ref, f"{self.data_key}-n{len(ref)}", inception,
                                         e.inception_weights, self.cache, e.kid_subsets, e.kid_subset_size, e.batch_size,
                                         device=resolve_device(e.device, "eval.device"),
                                         num_workers=self.cfg.data.num_workers))
        if "fd" in e.metrics:
            from sgdm.evaluation.feature_distance import feature_distance

            out.update(feature_distance(self.space, images, self.reference_stats(), e.batch_size))
        if "adherence" in e.metrics and conditions.kind in ("label", "box", "mask"):
            out.update(self._adherence(images, conditions, generator))
        return out

    def _annotation_space(self):
        """The annotation's own backbone (f runs on its features), which the distance's
        ``eval.feature_*`` space may differ from."""
        if self._ann_space is None:
            if self.ecfg.feature_backbone is None and self.ecfg.feature_weights is None and self.space is not None:
                self._ann_space = self.space
            else:
                from sgdm.evaluation.feature_distance import annotation_space
                from sgdm.devices import resolve_device

                self._ann_space = annotation_space(self.cfg.annotation, "annotation",
                                                   resolve_device(self.ecfg.device, "eval.device"))
        return self._ann_space

    def _adherence(self, images, conditions: EvalConditions, generator) -> dict:
        from sgdm.annotation.store import AnnotationStore
        from sgdm.evaluation.adherence import (box_adherence, cluster_adherence, image_tokens, mask_adherence,
                                               mask_adherence_probe)

        a = self.cfg.annotation
        if conditions.kind in ("label", "box"):
            out = {}
            if conditions.kind == "box":
                out.update(box_adherence(self._annotation_space(), images, conditions.boxes, a.lost,
                                         self.ecfg.batch_size, self.precision))
            if self.cluster_f is not None:  # None: a store without f (a note says so)
                out.update(cluster_adherence(self._annotation_space(), images, conditions.clusters, self.cluster_f,
                                             self.ecfg.batch_size, self.precision))
            return out
        space = self._annotation_space()
        store = AnnotationStore.open(a.store) if a.store is not None else None
        segmenter = store.segmenter() if store is not None else None
        tokens = image_tokens(space, images, self.ecfg.batch_size, self.precision)  # for every mask score
        out = mask_adherence(space, images, conditions.masks, a.num_classes, a.stego, a.kmeans, generator,
                             self.ecfg.batch_size, segmenter=segmenter, tokens=tokens)
        if store is not None and store.source == "gt":
            # labelled masks: the unsupervised score above cannot name the classes; a probe trained
            # on the real images' ground truth can (sgdm.evaluation.probe)
            probe, real = self._mask_probe(store, space)
            out.update(mask_adherence_probe(space, images, conditions.masks, probe, self.ecfg.batch_size,
                                            patches=tokens[0]))
            out.update(mask_probe_real_miou=real["miou"], mask_probe_real_pixel_accuracy=real["pixel_accuracy"])
            if "recon_miou" in real:
                out.update(mask_probe_recon_miou=real["recon_miou"],
                           mask_probe_recon_pixel_accuracy=real["recon_pixel_accuracy"])
        return out

    @torch.no_grad()
    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Real images [M, 3, H, W] -> encoded (posterior mean) and decoded by the run's autoencoder, on the CPU."""
        param = next(self.autoencoder.parameters())
        out = []
        for chunk in images.split(self.ecfg.batch_size):
            z = self.autoencoder.encode(chunk.to(param.device, param.dtype)).mean
            out.append(self.autoencoder.decode(z).float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def _mask_probe(self, store, space):
        """(token probe or pixel segmenter, per ``eval.probe.input``; its held-out real-image scores),
        fitted once per evaluation on the dataset images of the ground-truth store ``store`` (seed ``eval.seed``)."""
        if self._probe is None:
            from sgdm.evaluation.adherence import patch_tokens
            from sgdm.evaluation.probe import fit_with_held_out, real_probe_data

            start = time.process_time()
            generator = torch.Generator().manual_seed(self.ecfg.seed)
            images, masks = real_probe_data(self.dataset, store, self.ecfg.probe.max_images, generator)
            pixels = self.ecfg.probe.input == "pixels"

            def scorer_inputs(x):
                return x if pixels else patch_tokens(space, x, self.ecfg.batch_size, self.precision)

            # the same images through the run's autoencoder: what a perfect latent model would
            # produce, so the scorer's mIoU on them bounds the samples' score
            views = {} if self.autoencoder is None else \
                {"recon": lambda rows: scorer_inputs(self._reconstruct(images[rows]))}
            self._probe = fit_with_held_out(scorer_inputs(images), masks, store.num_classes, generator, self.ecfg.probe,
                                            views=views)
            recon = f", their reconstructions {self._probe[1]['recon_miou']:.4g}" if views else ""
            self.log(f"eval: mask {'segmenter' if pixels else 'probe'} on {len(images)} real images: "
                     f"held-out mIoU {self._probe[1]['miou']:.4g}{recon} "
                     f"({time.process_time() - start:.1f}s CPU)")
        return self._probe


def evaluate_run(run_dir: str | pathlib.Path, ecfg: EvalConfig | None = None,
                 log: Callable[[str], None] = _stderr, out_dir: str | pathlib.Path | None = None) -> Optional[dict]:
    """Evaluate run ``run_dir`` (EMA weights) per ``ecfg`` (default: the run's ``eval:`` section);
    the results go to ``out_dir`` (default ``<run_dir>/eval``, where ``sgdm-ldm eval`` writes them).

    In an initialised process group every rank must call it: they share the sampling (module
    docstring); rank 0 logs, writes and returns the results, which equal a one-process evaluation's up
    to the devices' float nondeterminism; the other ranks return None."""
    run_dir = pathlib.Path(run_dir)
    out_dir = run_dir / "eval" if out_dir is None else pathlib.Path(out_dir)
    rank, world = rank_world()
    if rank != 0:
        log = lambda _msg: None  # noqa: E731
    shares = Shares(out_dir / ".rank-samples", rank, world) if world > 1 else None

    def prepare():  # all that can fail before sampling, on every rank
        device = process_device(ecfg.device if ecfg is not None else "auto", world)
        cfg, pipe, weights = load_run_weights(run_dir, device)
        e = ecfg or recorded_eval(run_dir)
        e.check_files()  # an ecfg made by dataclasses.replace was not validated
        kind = cfg.model.guidance.kind
        if set(e.metrics) == {"adherence"}:  # before any scorer is built
            if kind == "none":
                raise ConfigError("eval.metrics", "adherence scores guided runs; this run has no guidance "
                                                  "(model.guidance.kind none), so nothing would be measured: ask "
                                                  "for fid, is, kid or fd")
            from sgdm.evaluation.store_checks import missing_cluster_f

            missing = missing_cluster_f(cfg) if kind == "label" else None
            if missing is not None:
                raise ConfigError("eval.metrics", f"adherence alone of a label run measures nothing here: {missing}; "
                                                  f"or ask for fid, is, kid or fd")
        if e.compile:
            pipe.compile()
        if shares is not None and rank == 0:
            shares.clear()  # a crashed evaluation's files; the other ranks write only after agree
        # rank 0 alone measures: only it loads the scorers and the reference images
        evaluator = _Evaluator(cfg, e, run_dir, log, autoencoder=pipe.autoencoder) if rank == 0 else None
        conditions = draw_conditions(kind, cfg.annotation.store, e.n, torch.Generator().manual_seed(e.seed))
        return cfg, e, pipe, weights, evaluator, conditions

    cfg, ecfg, pipe, weights, evaluator, conditions = agree(world, prepare)
    try:
        rows = _sample_and_measure(pipe, conditions, cfg.model.guidance.kind, ecfg, evaluator, shares, log)
    except BaseException as err:
        if shares is not None:
            shares.fail(err)
        raise
    if rank != 0:
        return None
    ann = evaluator._ann_space
    results = {
        "run": str(run_dir), "guidance": cfg.model.guidance.kind, "n": ecfg.n, "sampler": ecfg.sampler,
        "steps": ecfg.steps, "eta": ecfg.eta,
        # the spacing the sampler ran with (eval.spacing unset: the run's sampler.spacing or the sampler's
        # default, as the pipeline resolves it)
        "spacing": pipe.sampling_settings(ecfg.steps, ecfg.sampler, ecfg.eta, ecfg.spacing)[3], "weights": "ema",
        # the EMA weights evaluated: the training step they are of and the checkpoint or export they came from
        "step": weights["step"], "weights_file": weights["file"],
        "annotation_store": None if cfg.model.guidance.kind == "none" else str(cfg.annotation.store),
        "feature_extractor": None if evaluator.space is None else evaluator.space.metric,
        # what re-annotated the samples for adherence (the store's extractor, checked before sampling)
        "adherence_extractor": None if ann is None else {"backbone": ann.backbone.name,
                                                         "weights": ann.backbone.weights_id,
                                                         "input_size": list(ann.backbone.input_size),
                                                         "precision": extraction_precision(evaluator.precision,
                                                                                           ann.device)},
        "inception_weights": None if ecfg.inception_weights is None else str(ecfg.inception_weights),
        # the size of the reference set the distances were measured against: eval.reference_n is
        # capped at the dataset's size (eval_config keeps the value asked for)
        "reference_images": min(ecfg.reference_n, len(evaluator.dataset))
        if any(m in ecfg.metrics for m in (*INCEPTION, "fd")) else None,
        "eval_config": to_dict(ecfg), "results": rows,
        "notes": evaluator.notes,  # metrics asked for and not measured, and why
    }
    write_results(results, out_dir, plot=len(rows) > 1)
    if shares is not None:
        shares.clear()
    return results


def _sample_and_measure(pipe, conditions: EvalConditions, kind: str, ecfg: EvalConfig,
                        evaluator: Optional[_Evaluator], shares: Optional[Shares], log) -> list[dict]:
    """One row per guidance scale (rank 0; the other ranks sample their share and return [])."""
    from sgdm.pipeline import per_image_generators

    scales = [None] if kind == "none" else (ecfg.sweep_scales or [ecfg.guidance_scale])
    if kind == "none" and ecfg.sweep_scales:
        log(f"eval: the run has no guidance (model.guidance.kind: none), so the guidance scales "
            f"{ecfg.sweep_scales} (--sweep-scale, eval.sweep_scales) are one unguided evaluation")
    if evaluator is not None:
        evaluator.check_reference()  # read the reference images now: an unreadable one stops us before any sampling
    if shares is not None:
        bounds = [share(ecfg.n, ecfg.batch_size, r, shares.world) for r in range(shares.world)]
        lo, hi = bounds[shares.rank]
        idle = sum(b == a for a, b in bounds)
        if idle:
            log(f"eval: {ecfg.n} samples are {-(-ecfg.n // ecfg.batch_size)} batches of {ecfg.batch_size}, so "
                f"{idle} of {shares.world} processes sample nothing (lower eval.batch_size)")
    rows = []
    for index, scale in enumerate(scales):
        start = time.time()
        if shares is None:
            images = generate(pipe, conditions, scale, ecfg, ecfg.n)
        else:
            if shares.rank != 0:
                shares.check(0)  # rank 0 has stopped: nobody would read these samples
            # the generators of all eval.n images, as one process draws them, and this rank's slice
            generators = per_image_generators(torch.Generator().manual_seed(ecfg.seed), ecfg.n)[lo:hi]
            mine = generate(pipe, conditions.slice(lo, hi), scale, ecfg, hi - lo, generators) if hi > lo else None
            if shares.rank != 0:
                if mine is not None:
                    shares.put(index, mine)
                continue
            images = shares.gather(index, mine, bounds, log)
            del mine
        # each scale's scorers start from eval.seed, so a row of a sweep equals an evaluation at that scale alone
        row = {"guidance_scale": scale, **evaluator.measure(images, conditions, torch.Generator().manual_seed(ecfg.seed))}
        rows.append(row)
        log(f"eval: w={scale}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items() if k != "guidance_scale")
            + f" ({time.time() - start:.0f}s)")
    return rows


def markdown_cell(value) -> str:
    """A value as the text of a Markdown table cell: ``|`` would end the cell and a line break the
    row; backslashes are doubled first so that a name's own ``\\`` cannot escape the next ``|``."""
    text = "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").splitlines())


def markdown_table(rows: list[dict]) -> str:
    """Rows of {metric: value} as a Markdown table (metrics in first-seen order; cells escaped)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(markdown_cell(k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(markdown_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: pathlib.Path, plot: bool = False) -> pathlib.Path:
    """``results.json`` + ``results.md`` (+ ``sweep.png``) in ``out_dir``, each written atomically;
    the ``sweep.png`` of an earlier sweep goes when these results are not one."""
    from sgdm.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    spacing = f" ({results['spacing']} spacing)" if results.get("spacing") else ""
    step = f" of step {results['step']}" if results.get("step") is not None else ""
    head = (f"# Evaluation of {results['run']}\n\nEMA weights{step}, {results['n']} samples, {results['sampler']} "
            f"{results['steps']} steps{spacing}, eta {results['eta']}, guidance: {results['guidance']}"
            + (f"; reference set: the first {results['reference_images']} training images"
               if results.get("reference_images") else "") + ".\n"
            "`fd_<name>` is the Frechet distance in that feature extractor's space (not FID).\n\n")
    markdown = head + markdown_table(results["results"])
    if results.get("notes"):
        markdown += "\n" + "".join(f"- {note}\n" for note in results["notes"])
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", markdown)
    if plot:
        from sgdm.evaluation.plot import plot_sweep

        # numbers only: a row also names how it was scored (mask_matching)
        metrics = [k for k, v in results["results"][0].items() if k != "guidance_scale" and isinstance(v, (int, float))]
        plot_sweep(results["results"], metrics, out_dir / "sweep.png")
    else:
        (out_dir / "sweep.png").unlink(missing_ok=True)  # another evaluation's sweep, not of these results
    return out_dir

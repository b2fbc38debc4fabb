"""Self-annotation (the paper's g and f, Sec. 3.2, Eq. 6): clusters, LOST boxes, STEGO masks.

Public surface: :func:`annotate` (dataset -> annotation store), :class:`AnnotationStore`
(what training reads), :class:`AnnotationConfig` (the ``annotation:`` section).
Heavy modules load on first use.

From the shell::

    sgdm-ldm annotate configs/X.yaml --granularity box --evaluate     # resumable
    torchrun --nproc_per_node 8 -m sgdm.cli.main annotate configs/X.yaml
    sgdm-ldm clusters STORE --out gallery.html

From Python::

    from sgdm.annotation import annotate, AnnotationStore
    result = annotate(cfg, "label", evaluate=True)     # cfg: ExperimentConfig
    AnnotationStore.open(result.store).get(image_id)   # {"cluster": 17}

Modules: ``features`` (timm backbones: CLS, patch tokens, last-layer keys),
``kmeans`` (torch k-means, CPU or one GPU up to the paper's 1.3M x 768 x 10k),
``lost`` (boxes), ``stego`` (segmentation head, correspondence loss, data-parallel
training, cluster probe; no CRF refinement), ``resume`` (the head's checkpoints,
the fitted f and the mask chunks that let a mask run resume), ``ranks`` (an error on one rank
stops them all), ``patches`` (patch features read
from the shards a batch at a time: bounded memory for masks), ``store`` (sharded
safetensors + manifest), ``ground_truth`` (the supervised twin), ``metrics``
(NMI, ARI, purity, CorLoc, mIoU), ``gallery`` (HTML), ``annotate`` (the pipeline).
"""
from __future__ import annotations

from sgdm._lazy import lazy_attributes

from sgdm.annotation.config import AnnotationConfig

_LAZY = {
    "annotate": "sgdm.annotation.annotate",
    "AnnotationResult": "sgdm.annotation.annotate",
    "AnnotationStore": "sgdm.annotation.store",
    "StoreMismatchError": "sgdm.annotation.store",
    "write_store": "sgdm.annotation.store",
    "kmeans": "sgdm.annotation.kmeans",
    "load_backbone": "sgdm.annotation.features",
    "write_gallery": "sgdm.annotation.gallery",
}

__all__ = ["AnnotationConfig", *_LAZY]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

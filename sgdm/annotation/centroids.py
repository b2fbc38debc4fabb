"""The self-labelling function f of ``label`` and ``box`` stores: the nearest k-means centroid of an image's CLS feature.

``sgdm-ldm annotate`` clusters the images' CLS features (Sec. 3.2, Eq. 6) after
:func:`prepare`: stored as float16 in the feature cache, then L2-normalised in
float32. The centroids ``[K, D]`` live in that normalised space (they are means
of unit vectors, not unit vectors themselves), and an image's cluster is the
nearest centroid in Euclidean distance (:meth:`ClusterF.assign`). annotate saves
them beside the store (:data:`CENTROIDS_FILE`, named in the manifest's
``centroids``, its SHA-256 in ``centroids_sha256``), so that evaluation can apply
the same f to generated images (cluster adherence).
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["CENTROIDS_FILE", "PREPROCESS", "ClusterF", "prepare"]

CENTROIDS_FILE = "centroids.safetensors"
# what prepare() does, recorded in the file: a file of another preprocessing is refused, not misapplied
PREPROCESS = "cls,float16,l2"


def prepare(cls: torch.Tensor) -> torch.Tensor:
    """CLS features ``[N, D]`` as k-means sees them: rounded to float16 (the feature cache's precision),
    then L2-normalised rows in a new float32 tensor (a float16 input is converted once, normalised in place)."""
    if cls.dim() != 2:
        raise ValueError(f"CLS features must be [N, D], got shape {tuple(cls.shape)}")
    x = cls.to(torch.float16).float()
    return F.normalize(x, dim=1, out=x)


class ClusterF:
    """f of a label or box store: ``centroids [K, D]`` (float32) in the space of :func:`prepare`."""

    def __init__(self, centroids: torch.Tensor):
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ValueError(f"ClusterF: centroids must be [K, D] with K >= 1, got shape {tuple(centroids.shape)}")
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError("ClusterF: centroids hold NaN or inf values")
        self.centroids = centroids.detach().float().cpu().contiguous()

    num_classes = property(lambda self: self.centroids.shape[0], doc="K, the number of clusters.")
    dim = property(lambda self: self.centroids.shape[1], doc="D, the width of the CLS features f takes.")

    def assign(self, cls: torch.Tensor) -> torch.Tensor:
        """Cluster ids ``[N]`` int64 in [0, K) of CLS features ``[N, D]``: the nearest centroid of :func:`prepare`'d rows."""
        from sgdm.annotation.kmeans import assign

        if cls.dim() != 2 or cls.shape[1] != self.dim:
            raise ValueError(f"ClusterF.assign: CLS features of shape {tuple(cls.shape)}, the centroids take "
                             f"[N, {self.dim}] (features of another backbone?)")
        return assign(prepare(cls.cpu()), self.centroids)[0]

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """One safetensors file, written atomically: ``centroids``, and :data:`PREPROCESS` in its metadata."""
        from sgdm.annotation.store import save_tensors_atomic

        path = pathlib.Path(path)
        save_tensors_atomic(path, {"centroids": self.centroids}, {"preprocess": PREPROCESS})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClusterF":
        from sgdm.annotation.store import read_tensors

        path = pathlib.Path(path)
        tensors, metadata = read_tensors(path, "centroids file")
        if metadata.get("preprocess") != PREPROCESS:
            raise ValueError(f"centroids file {path}: preprocessing {metadata.get('preprocess')!r}, this sgdm applies "
                             f"{PREPROCESS!r}; rerun `sgdm-ldm annotate` with this sgdm")
        if "centroids" not in tensors:
            raise ValueError(f"centroids file {path} has no 'centroids' tensor")
        return cls(tensors["centroids"])

    @classmethod
    def of_store(cls, store) -> Optional["ClusterF"]:
        """The f that made the cluster ids of :class:`~sgdm.annotation.store.AnnotationStore` ``store``, or None
        where it kept none (ground truth, a mask store, or one written before annotate kept its centroids).
        A file missing, changed since the manifest was written, or of another K than the store is an error."""
        from sgdm.annotation.features import file_sha256

        name = store.manifest.get("centroids")
        if name is None:
            return None
        path = pathlib.Path(store.path) / name
        if not path.is_file():
            raise FileNotFoundError(f"annotation store {store.path}: centroids file {name} is missing")
        recorded = store.manifest.get("centroids_sha256")
        if recorded and file_sha256(path) != recorded:
            raise ValueError(f"annotation store {store.path}: centroids file {name} is not the one its manifest "
                             f"records (sha256 {recorded[:12]}...): replaced since? annotate the store again")
        f = cls.load(path)
        if f.num_classes != store.num_classes:
            raise ValueError(f"annotation store {store.path}: its centroids file {name} has {f.num_classes} clusters, "
                             f"its manifest K={store.num_classes}; the store is inconsistent: annotate it again")
        return f

"""Torn files: a feature shard or store shard that cannot be read, and writes that fail half-way."""
import errno
import os

import pytest
import torch

from sgdm.annotation import store as store_module
from sgdm.annotation.annotate import annotate
from sgdm.annotation.store import AnnotationStore, save_tensors_atomic, write_store

from .test_annotate import config


def _tear(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_torn_feature_shard_is_extracted_again_and_named(tmp_path, tiny_weights, shapes_cache):
    cfg = config(tmp_path, tiny_weights, shapes_cache)
    first = AnnotationStore.open(annotate(cfg, progress=False, log=lambda m: None).store).tensor("cluster")
    torn = cfg.annotation.store / "work" / "features_00001.safetensors"
    _tear(torn)  # e.g. a copy cut short, or a crash before the data reached the disk
    messages = []
    again = AnnotationStore.open(annotate(cfg, progress=False, log=messages.append).store)
    assert any("cannot be read" in m and str(torn) in m for m in messages), messages
    assert torch.equal(again.tensor("cluster"), first)


def test_a_torn_store_shard_is_named(tmp_path):
    write_store(tmp_path / "s", ["a", "b"], {"cluster": torch.tensor([0, 1])}, granularity="label", num_classes=2)
    _tear(tmp_path / "s" / "shard_00000.safetensors")
    with pytest.raises(ValueError, match=r"annotation store .*s: shard shard_00000.safetensors cannot be read"):
        AnnotationStore.open(tmp_path / "s").get("a")


def test_a_write_that_fails_half_way_leaves_no_temporary_file(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class DiskFull:  # the temporary file fills up after 100 bytes
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_full(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return DiskFull(handle) if str(file).endswith(".tmp") and "w" in mode else handle

    monkeypatch.setattr(builtins, "open", open_full)
    with pytest.raises(OSError, match="No space left"):
        save_tensors_atomic(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    assert os.listdir(tmp_path) == []


def test_the_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    from sgdm.training import checkpoint as atomic_module  # the atomic writes the store uses

    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # the files' data; the folder's fsync after the rename is counted apart
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync")
        real_fsync(fd)

    monkeypatch.setattr(atomic_module.os, "fsync", fsync)
    monkeypatch.setattr(atomic_module.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_tensors_atomic(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
    store_module.atomic_write_text(tmp_path / "m.json", "{}")
    assert [e for e in events if e != "fsync-dir"] == ["fsync", "replace", "fsync", "replace"]


def test_a_torn_manifest_or_fingerprint_is_named(tmp_path):
    from sgdm.annotation.cache import FeatureCache

    write_store(tmp_path / "s", ["a"], {"cluster": torch.tensor([0])}, granularity="label", num_classes=1)
    (tmp_path / "s" / "manifest.json").write_text('{"version": 1, "granul')
    with pytest.raises(ValueError, match=r"annotation store .*s: manifest.json cannot be read as JSON"):
        AnnotationStore.open(tmp_path / "s")
    FeatureCache(tmp_path / "work", {"backbone": "x"})
    (tmp_path / "work" / "fingerprint.json").write_text("")
    with pytest.raises(ValueError, match=r"work.fingerprint.json cannot be read as JSON"):
        FeatureCache(tmp_path / "work", {"backbone": "x"})


def test_a_torn_segmenter_file_is_named(tmp_path):
    from sgdm.annotation.stego import Segmenter

    path = Segmenter(torch.eye(2)).save(tmp_path / "segmenter.safetensors")
    _tear(path)
    with pytest.raises(ValueError, match=r"segmenter file .*segmenter.safetensors cannot be read"):
        Segmenter.load(path)

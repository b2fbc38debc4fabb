"""Mask assignment resumes chunk by chunk, and ``annotate`` run again after a crash in head training or
mask assignment continues where it stopped and writes the store an uninterrupted run writes; the
intermediate files go once the store is written (the head checkpoint stays, as the features do)."""
import pytest
import torch

from sgdm.annotation import annotate as annotate_module
from sgdm.annotation import stego as stego_module
from sgdm.annotation.config import KMeansConfig, StegoConfig
from sgdm.annotation.resume import HEAD_FILE, MASKS_DIR, SEGMENTER_FIT_FILE, MaskChunks
from sgdm.annotation.stego import Segmenter, segment
from sgdm.annotation.store import AnnotationStore

CFG = StegoConfig(method="kmeans", mask_size=0, batch_size=2)


def patches():
    return torch.randn(7, 2, 2, 3, generator=torch.Generator().manual_seed(0))


def masks(chunks, segmenter=None):
    segmenter = segmenter or Segmenter(torch.eye(3))
    return segment(patches(), torch.zeros(7, 3), 3, CFG, KMeansConfig(), torch.Generator(), segmenter=segmenter,
                   chunks=chunks)


def assigned(monkeypatch, crash=None):
    """Rows assigned by each Segmenter.assign call; with ``crash``, that call raises."""
    real, calls = Segmenter.assign, []

    def assign(self, rows, *args, **kwargs):
        calls.append(rows.lo)
        if len(calls) == crash:
            raise KeyboardInterrupt
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "assign", assign)
    return calls


def test_a_stopped_assignment_resumes_at_the_first_missing_chunk(tmp_path, monkeypatch):
    reference = masks(None)
    messages = []
    chunks = MaskChunks(tmp_path / "masks", {"features": "x"}, rows=3, log=messages.append)
    assigned(monkeypatch, crash=3)
    with pytest.raises(KeyboardInterrupt):
        masks(chunks)
    calls = assigned(monkeypatch)
    got = masks(chunks)
    assert calls == [6] and torch.equal(got, reference)  # chunks [0, 3) and [3, 6) were read back
    assert messages == [f"annotate: resuming mask assignment, 2 of 3 chunks of 3 images already assigned in "
                        f"{tmp_path / 'masks'}"]


@pytest.mark.parametrize("damage", ["other segmenter", "other features", "truncated", "wrong shape"])
def test_chunks_of_another_run_or_damaged_are_assigned_again(tmp_path, monkeypatch, damage):
    messages = []
    chunks = MaskChunks(tmp_path / "masks", {"features": "x"}, rows=3, log=messages.append)
    other = Segmenter(torch.eye(3).flip(0))
    masks(chunks, other if damage == "other segmenter" else None)
    if damage == "other features":
        chunks = MaskChunks(tmp_path / "masks", {"features": "y"}, rows=3, log=messages.append)
    elif damage == "truncated":
        chunks.path(1).write_bytes(chunks.path(1).read_bytes()[:40])
    elif damage == "wrong shape":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(chunks.path(1)), framework="pt") as handle:  # its identity, two maps instead of three
            save_file({"mask": torch.zeros(2, 2, 2, dtype=torch.uint8)}, str(chunks.path(1)), handle.metadata())
    calls = assigned(monkeypatch)
    got = masks(chunks)
    monkeypatch.undo()
    assert torch.equal(got, masks(None))
    if damage in ("truncated", "wrong shape"):
        assert calls == [3] and f"annotate: assigning 1 mask chunk(s) again: their files cannot be read or were made by another " \
                                f"segmenter or settings, e.g. {chunks.path(1)}" in messages
    else:
        assert calls == [0, 3, 6] and any("assigning 3 mask chunk(s) again" in m for m in messages)


def test_mask_chunk_rows_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        MaskChunks(tmp_path, rows=0)


def _config(tmp_path, tiny_weights, shapes_cache):
    from .test_annotate import config

    stego = {"epochs": 2, "batch_size": 16, "dim": 8, "feature_samples": 0}
    return config(tmp_path, tiny_weights, shapes_cache, 48, num_classes=3, stego=stego)


def _same_store(a, b):
    a, b = AnnotationStore.open(a), AnnotationStore.open(b)
    assert a.ids == b.ids and torch.equal(a.tensor("mask"), b.tensor("mask"))
    assert (a.path / "segmenter.safetensors").read_bytes() == (b.path / "segmenter.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_weights, shapes_cache):
    from sgdm.annotation.annotate import annotate

    path = tmp_path_factory.mktemp("reference")
    return annotate(_config(path, tiny_weights, shapes_cache), "mask", progress=False, log=lambda m: None).store


def test_annotate_resumes_head_training(tmp_path, tiny_weights, shapes_cache, monkeypatch, reference):
    from sgdm.annotation.annotate import annotate

    cfg = _config(tmp_path, tiny_weights, shapes_cache)  # 48 images, batches of 16: 3 steps an epoch, 6 in all
    monkeypatch.setattr(annotate_module, "HEAD_CHECKPOINT_STEPS", 2)
    real, calls = stego_module.stego_loss, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stego_module, "stego_loss", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        annotate(cfg, "mask", progress=False, log=lambda m: None)
    monkeypatch.setattr(stego_module, "stego_loss", real)
    messages = []
    annotate(cfg, "mask", progress=False, log=messages.append)
    work = cfg.annotation.store / "work"
    assert f"annotate: resuming STEGO head training at step 2 of 6 from {work / HEAD_FILE}" in messages
    _same_store(cfg.annotation.store, reference)
    assert (work / HEAD_FILE).is_file()  # kept: another K or CRF reuses the head
    assert not (work / SEGMENTER_FIT_FILE).exists() and not (work / MASKS_DIR).exists()


def test_annotate_resumes_mask_assignment_with_the_saved_segmenter(tmp_path, tiny_weights, shapes_cache, monkeypatch,
                                                                   reference):
    from sgdm.annotation.annotate import annotate

    cfg = _config(tmp_path, tiny_weights, shapes_cache)
    monkeypatch.setattr(annotate_module, "MASK_CHUNK_ROWS", 16)
    assigned(monkeypatch, crash=2)
    with pytest.raises(KeyboardInterrupt):
        annotate(cfg, "mask", progress=False, log=lambda m: None)
    work = cfg.annotation.store / "work"
    assert (work / SEGMENTER_FIT_FILE).is_file() and len(list((work / MASKS_DIR).iterdir())) == 1
    calls = assigned(monkeypatch)

    def no_fit(*args, **kwargs):
        raise AssertionError("f was fitted again")

    monkeypatch.setattr(annotate_module, "fit_segmenter", no_fit)
    messages = []
    annotate(cfg, "mask", progress=False, log=messages.append)
    assert calls == [16, 32]
    assert f"annotate: reusing the fitted segmenter (STEGO head and centroids) in {work / SEGMENTER_FIT_FILE}" in messages
    assert any(m.startswith("annotate: resuming mask assignment, 1 of 3 chunks of 16 images") for m in messages)
    _same_store(cfg.annotation.store, reference)
    assert not (work / SEGMENTER_FIT_FILE).exists() and not (work / MASKS_DIR).exists()


def test_a_segmenter_fitted_with_other_settings_is_fitted_again(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    from sgdm.annotation.annotate import annotate

    cfg = _config(tmp_path, tiny_weights, shapes_cache)
    assigned(monkeypatch, crash=1)  # f fitted and saved, no mask assigned
    with pytest.raises(KeyboardInterrupt):
        annotate(cfg, "mask", progress=False, log=lambda m: None)
    monkeypatch.undo()
    cfg.annotation.num_classes = 4
    messages = []
    annotate(cfg, "mask", progress=False, log=messages.append)
    work = cfg.annotation.store / "work"
    assert any(m.startswith(f"annotate: not using {work / SEGMENTER_FIT_FILE}: it was made with other num_classes")
               for m in messages)
    assert any(m.startswith("annotate: STEGO head already trained (6 steps)") for m in messages)  # K is not in it
    assert AnnotationStore.open(cfg.annotation.store).num_classes == 4


def test_the_finished_store_removes_the_temporaries_of_writes_a_crash_cut_short(tmp_path):
    """A process killed while writing the fitted f or a head checkpoint leaves sgdm.atomic's ".<name>.<pid>.tmp"
    beside it (the head checkpoint's ~8 MB at ViT-B/16); nothing reads them, so they go with the intermediates.
    The head checkpoint itself stays, as do files of other names."""
    from sgdm.annotation.resume import remove_intermediates

    (tmp_path / MASKS_DIR).mkdir()
    (tmp_path / MASKS_DIR / ".masks_00000.safetensors.12.tmp").write_bytes(b"x")
    for name in (SEGMENTER_FIT_FILE, HEAD_FILE, "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    for name in (f".{SEGMENTER_FIT_FILE}.12.tmp", f".{HEAD_FILE}.34.tmp"):
        (tmp_path / name).write_bytes(b"x")
    remove_intermediates(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([HEAD_FILE, "notes.txt"])


def test_chunks_written_with_another_chunk_size_are_assigned_again(tmp_path, monkeypatch):
    """Chunk 2 is rows [6, 7) at 3 rows a chunk and rows [2, 3) at 1: the same shape, other images."""
    masks(MaskChunks(tmp_path / "masks", {"features": "x"}, rows=3))
    calls = assigned(monkeypatch)
    got = masks(MaskChunks(tmp_path / "masks", {"features": "x"}, rows=1))
    monkeypatch.undo()
    assert calls == list(range(7)) and torch.equal(got, masks(None))

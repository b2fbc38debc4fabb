"""STEGO head training resumes from its checkpoint: a run stopped at any step and run again ends with the
weights (and the caller's generator state) of a run never stopped; a checkpoint that cannot be read or was
made from other inputs is not used, and says so."""
import pytest
import torch

from sgdm.annotation import stego as stego_module
from sgdm.annotation.config import StegoConfig
from sgdm.annotation.resume import HeadCheckpoint
from sgdm.annotation.stego import train_head

# 6 images, batches of 2: 3 steps an epoch, 9 in all; spatial samples, kNN and random partners all drawn
CFG = dict(dim=4, epochs=3, batch_size=2, knn=2, feature_samples=2)


def data():
    patches = torch.randn(6, 3, 3, 8, generator=torch.Generator().manual_seed(0)).half()
    return patches, torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def run(checkpoint=None, seed=3, **cfg):
    generator = torch.Generator().manual_seed(seed)
    head = train_head(*data(), StegoConfig(**{**CFG, **cfg}), generator, checkpoint=checkpoint)
    return head.state_dict(), generator.get_state()


def assert_same(a, b):
    (weights_a, gen_a), (weights_b, gen_b) = a, b
    for name, value in weights_a.items():
        assert torch.equal(value, weights_b[name]), name
    assert torch.equal(gen_a, gen_b)  # the probe fitted after draws the same numbers


def stop_at(monkeypatch, call):
    """Make the ``call``-th loss of the next run raise (a crash during that step)."""
    real, calls = stego_module.stego_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stego_module, "stego_loss", loss)
    return calls


def counting(monkeypatch):
    real, calls = stego_module.stego_loss, []
    monkeypatch.setattr(stego_module, "stego_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("every, crash, resumed_at", [(2, 6, 4), (3, 8, 6), (4, 2, None)])
def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, monkeypatch, every, crash, resumed_at):
    # (2, 6, 4): stopped in step 6, saved after step 4 (inside epoch 2: its permutation is drawn again);
    # (3, 8, 6): saved at an epoch's end; (4, 2, None): stopped before the first checkpoint
    reference = run()
    messages = []
    checkpoint = HeadCheckpoint(tmp_path / "head.safetensors", {"features": "x"}, every, messages.append)
    stop_at(monkeypatch, crash)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint)
    monkeypatch.undo()
    steps = counting(monkeypatch)
    assert_same(run(checkpoint), reference)
    assert len(steps) == 9 - (resumed_at or 0)
    if resumed_at:
        assert messages == [f"annotate: resuming STEGO head training at step {resumed_at} of 9 from {checkpoint.path}"]
    else:
        assert messages == []


def test_checkpoints_do_not_change_the_training(tmp_path):
    assert_same(run(HeadCheckpoint(tmp_path / "head.safetensors", every=1)), run())


def test_a_finished_checkpoint_skips_training_and_a_longer_run_continues_it(tmp_path, monkeypatch):
    messages = []
    checkpoint = HeadCheckpoint(tmp_path / "head.safetensors", every=100, log=messages.append)
    run(checkpoint, epochs=2)  # saved after its last step, 6
    reference = run(epochs=2)
    steps = counting(monkeypatch)
    assert_same(run(checkpoint, epochs=2), reference)
    assert steps == [] and messages[-1].startswith("annotate: STEGO head already trained (6 steps)")
    assert_same(run(checkpoint), run())  # 3 epochs: steps 7-9 on top (the 6-step head is kept, see test_stego_head_kept)
    assert messages[-1].startswith("annotate: resuming STEGO head training at step 6 of 9 from ")
    messages.clear()
    assert_same(run(checkpoint, epochs=1), run(epochs=1))  # holds step 9 of a 3-step run: not used
    assert "it holds step 9, this run trains 3 steps" in messages[0]


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"knn": 3}, {"seed": 4}, {"identity": "y"}])
def test_a_checkpoint_made_from_other_inputs_is_not_used(tmp_path, change):
    path = tmp_path / "head.safetensors"
    run(HeadCheckpoint(path, {"features": "x"}, every=1), epochs=1)
    messages = []
    identity = {"features": change.pop("identity", "x")}
    got = run(HeadCheckpoint(path, identity, every=100, log=messages.append), **change)
    assert_same(got, run(**change))
    assert len(messages) == 2 and f"not using {path}: it was made with other" in messages[0]
    assert messages[1] == "annotate: training the STEGO head from the start"


def test_other_cls_features_are_not_resumed(tmp_path):
    path = tmp_path / "head.safetensors"
    patches, cls = data()
    train_head(patches, cls, StegoConfig(**CFG), torch.Generator().manual_seed(3), checkpoint=HeadCheckpoint(path))
    messages = []
    train_head(patches, cls + 1, StegoConfig(**CFG), torch.Generator().manual_seed(3),
               checkpoint=HeadCheckpoint(path, log=messages.append))
    assert "other cls than this run" in messages[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no identity"])
def test_an_unreadable_checkpoint_is_named_and_training_starts_over(tmp_path, damage):
    from safetensors.torch import save_file

    path = tmp_path / "head.safetensors"
    run(HeadCheckpoint(path, every=4))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        save_file({"x": torch.zeros(1)}, str(path))
    messages = []
    assert_same(run(HeadCheckpoint(path, every=4, log=messages.append)), run())
    assert messages[0].startswith(f"annotate: not using {path}: it cannot be read")
    assert messages[1:] == ["annotate: training the STEGO head from the start"]
    assert path.is_file() and not list(tmp_path.glob("head.*.step*"))  # rewritten whole: nothing in it to keep


def test_a_checkpoint_of_this_run_that_does_not_fit_the_head_names_its_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "head.safetensors"
    run(HeadCheckpoint(path, every=4))
    tensors = load_file(str(path))
    del tensors["generator"]
    with safe_open(str(path), framework="pt") as handle:  # its identity and step, a tensor short
        save_file(tensors, str(path), handle.metadata())
    with pytest.raises(ValueError, match=f"STEGO head checkpoint {path} does not fit this head"):
        run(HeadCheckpoint(path, every=4))


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_checkpoint_interval_must_be_a_positive_step_count(tmp_path, every):
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        HeadCheckpoint(tmp_path / "head.safetensors", every=every)


def test_the_identity_digest_of_features_reads_them_in_place():
    """tensor_digest hashes every start's CLS features (181 MB for COCO's 118k at ViT-B float16): without a
    bytes copy of them beside the tensor; the digest is that of the dtype, shape and bytes."""
    import hashlib
    import tracemalloc

    from sgdm.annotation.resume import tensor_digest

    cls = torch.arange(1 << 23, dtype=torch.int32).view(torch.float16).reshape(-1, 64)  # 32 MB
    tracemalloc.start()
    try:
        got = tensor_digest(cls)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20)
    expected = hashlib.sha256(f"{cls.dtype}{tuple(cls.shape)}".encode() + cls.view(torch.uint8).numpy().tobytes())
    assert got == expected.hexdigest()

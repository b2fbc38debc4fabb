"""A STEGO head checkpoint is never destroyed by a run that cannot continue it: a run with fewer epochs or
other settings keeps the head it finds under a name by its identity and step, and a later run whose settings
match reads or continues that kept head instead of training again."""
import re

import pytest

from sgdm.annotation.resume import HeadCheckpoint

from .test_stego_resume import assert_same, counting, run, stop_at


def _checkpoint(tmp_path, messages=None, every=100):
    return HeadCheckpoint(tmp_path / "head.safetensors", {"features": "x"}, every,
                          None if messages is None else messages.append)


def _kept(tmp_path):
    return sorted(tmp_path.glob("head.*.step*.safetensors"))


def test_a_shorter_run_keeps_the_longer_finished_head(tmp_path, monkeypatch):
    run(_checkpoint(tmp_path))  # 3 epochs: 9 steps
    messages = []
    assert_same(run(_checkpoint(tmp_path, messages), epochs=1), run(epochs=1))
    (kept,) = _kept(tmp_path)
    assert kept.name.startswith("head.") and kept.name.endswith(".step9.safetensors")
    assert messages[0] == (f"annotate: not using {tmp_path / 'head.safetensors'}: it holds step 9, this run trains 3 "
                           f"steps; kept it as {kept}")
    reference, steps, messages = run(), counting(monkeypatch), []
    assert_same(run(_checkpoint(tmp_path, messages)), reference)  # the 3 epochs again: read, not trained
    assert steps == [] and messages == [f"annotate: STEGO head already trained (9 steps), read from {kept}"]


def test_a_longer_run_keeps_the_shorter_finished_head(tmp_path, monkeypatch):
    run(_checkpoint(tmp_path), epochs=2)  # 6 steps, finished
    messages = []
    assert_same(run(_checkpoint(tmp_path, messages)), run())  # trained on from step 6 to 9
    (kept,) = _kept(tmp_path)
    assert messages == [f"annotate: the STEGO head in {tmp_path / 'head.safetensors'} is trained (6 steps) and this "
                        f"run trains it on to 9; kept it as {kept}",
                        f"annotate: resuming STEGO head training at step 6 of 9 from {kept}"]
    reference, steps = run(epochs=2), counting(monkeypatch)
    assert_same(run(_checkpoint(tmp_path), epochs=2), reference)
    assert steps == []


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"dim": 3}])
def test_other_settings_keep_the_head_and_switching_back_reads_it(tmp_path, monkeypatch, change):
    run(_checkpoint(tmp_path))
    messages = []
    assert_same(run(_checkpoint(tmp_path, messages), **change), run(**change))
    (kept,) = _kept(tmp_path)
    (name, here), there = next(iter(change.items())), {"lr": 5e-4, "dim": 4}  # the defaults of run()
    there = there[name]
    assert messages[0] == (f"annotate: not using {tmp_path / 'head.safetensors'}: it was made with other stego.{name} "
                           f"than this run (stego.{name} {there!r} there, {here!r} here); kept it as {kept}")
    assert messages[1] == "annotate: training the STEGO head from the start"
    references, steps = (run(), run(**change)), counting(monkeypatch)
    assert_same(run(_checkpoint(tmp_path)), references[0])  # back to the first settings: its kept head, read
    assert_same(run(_checkpoint(tmp_path), **change), references[1])  # and the other's, still in place
    assert steps == []


def test_a_crashed_longer_run_is_kept_and_continued_by_its_rerun(tmp_path, monkeypatch):
    stop_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run(_checkpoint(tmp_path, every=2))  # saved after step 6 of 9
    monkeypatch.undo()
    run(_checkpoint(tmp_path, every=2), epochs=1)  # 3 steps: keeps step 6 aside
    reference, steps, messages = run(), counting(monkeypatch), []
    assert_same(run(_checkpoint(tmp_path, messages, every=2)), reference)
    assert len(steps) == 3  # steps 7-9, continued from the kept state
    names = sorted(p.name.rsplit(".", 2)[-2] for p in _kept(tmp_path))
    assert names == ["step3"]  # the 1-epoch head kept; the crashed run's state moved back and finished
    assert messages[-1] == f"annotate: resuming STEGO head training at step 6 of 9 from {tmp_path / 'head.safetensors'}"


def test_annotate_with_fewer_epochs_keeps_the_longer_head(tmp_path, tiny_weights, shapes_cache, monkeypatch):
    from sgdm.annotation.annotate import annotate
    from sgdm.annotation.resume import HEAD_FILE

    from .test_annotate import config

    def cfg(epochs):
        return config(tmp_path, tiny_weights, shapes_cache, num_images=16, shard_size=8, num_classes=3,
                      stego={"epochs": epochs, "batch_size": 8, "dim": 4, "feature_samples": 0})

    annotate(cfg(2), "mask", progress=False, log=lambda m: None)
    annotate(cfg(1), "mask", progress=False, log=lambda m: None)
    work = tmp_path / "store" / "work"
    (kept,) = sorted(work.glob("stego_head.*.step*.safetensors"))
    assert kept.name.endswith(".step4.safetensors") and (work / HEAD_FILE).is_file()
    steps, messages = counting(monkeypatch), []
    annotate(cfg(2), "mask", progress=False, log=messages.append)  # the 2-epoch head again: read, not trained
    assert steps == [] and f"annotate: STEGO head already trained (4 steps), read from {kept}" in messages


def test_a_kept_head_that_does_not_fit_is_named_in_the_error(tmp_path):
    """The head read may be a kept one: the error names that file, not the checkpoint path (which holds
    another head, and deleting it would not help)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run(_checkpoint(tmp_path))  # 9 steps
    run(_checkpoint(tmp_path), epochs=1)  # keeps the 9-step head aside
    (kept,) = _kept(tmp_path)
    tensors = load_file(str(kept))
    del tensors["generator"]
    with safe_open(str(kept), framework="pt") as handle:  # its identity and step, a tensor short
        save_file(tensors, str(kept), handle.metadata())
    with pytest.raises(ValueError, match=f"STEGO head checkpoint {re.escape(str(kept))} does not fit this head"):
        run(_checkpoint(tmp_path))

"""sgdm.quickstart.variants.seed_continuation: a new run dir that resumes where another run stopped."""
import pathlib

import pytest
import torch

from sgdm.quickstart.variants import seed_continuation


def _run(root: pathlib.Path, steps: list[int]) -> pathlib.Path:
    (root / "checkpoints").mkdir(parents=True)
    for step in steps:
        torch.save({"global_step": step}, root / "checkpoints" / f"step-{step:08d}.ckpt")
    (root / "config.yaml").write_text("train:\n  max_steps: 24\n")
    return root


def test_continuation_copies_the_newest_valid_checkpoint_and_the_config(tmp_path):
    src = _run(tmp_path / "gt-mask", [20, 24])
    (src / "checkpoints" / "step-00000028.ckpt").write_bytes(b"half-written")  # newer but corrupt: skipped
    dst = tmp_path / "gt-mask-180steps"
    copied = seed_continuation(src, dst)
    assert copied == dst / "checkpoints" / "step-00000024.ckpt"
    assert torch.load(copied, weights_only=True) == {"global_step": 24}
    assert (dst / "config.yaml").read_text() == (src / "config.yaml").read_text()
    assert sorted(p.name for p in (dst / "checkpoints").iterdir()) == ["step-00000024.ckpt"]  # no temporary left
    assert sorted(p.name for p in (src / "checkpoints").iterdir()) == [
        "step-00000020.ckpt", "step-00000024.ckpt", "step-00000028.ckpt"]  # the source is untouched


def test_a_continuation_under_way_or_finished_is_left_alone(tmp_path):
    src = _run(tmp_path / "src", [24])
    under_way = _run(tmp_path / "under-way", [60])
    assert seed_continuation(src, under_way) is None
    assert sorted(p.name for p in (under_way / "checkpoints").iterdir()) == ["step-00000060.ckpt"]
    done = tmp_path / "done"
    (done / "pipeline").mkdir(parents=True)
    assert seed_continuation(src, done) is None and not (done / "checkpoints").exists()


def test_a_source_without_a_valid_checkpoint_is_named(tmp_path):
    src = tmp_path / "src"
    (src / "checkpoints").mkdir(parents=True)
    (src / "checkpoints" / "step-00000024.ckpt").write_bytes(b"truncated")
    with pytest.raises(FileNotFoundError, match=r"src/checkpoints: no valid checkpoint to continue from"):
        seed_continuation(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_a_finished_variant_trained_with_other_settings_is_refused(tmp_path):
    """train_variant reused any finished variant run: a companion trained for other
    prepare.companion_steps or another K kept its old weights in the report without a word."""
    from sgdm.config.core import ConfigError, dump_yaml, from_dict
    from sgdm.config.schema import ExperimentConfig, recorded_config
    from sgdm.quickstart.variants import guidance_variant, train_variant
    from tests.evaluation.helpers import tiny_config

    cfg = from_dict(ExperimentConfig, tiny_config(tmp_path, "label"))

    def variant(classes, steps):
        return guidance_variant(cfg, "mask", "self", classes=classes, store_root=tmp_path / "stores",
                                run_dir=tmp_path / "companions", run_name="mask", max_steps=steps)

    done = variant(3, 4)
    (done.run.path / "pipeline").mkdir(parents=True)
    (done.run.path / "config.yaml").write_text(dump_yaml(recorded_config(done)))
    logged = []
    assert train_variant(variant(3, 4), logged.append) == done.run.path  # the same settings: reused
    assert logged == [f"variant mask: reusing {done.run.path / 'pipeline'}"]
    with pytest.raises(ConfigError, match=r"train.max_steps: variant run .*companions/mask was trained with other "
                                          r"settings \(train.max_steps differ from its config.yaml\); delete"):
        train_variant(variant(3, 8), logged.append)
    with pytest.raises(ConfigError, match=r"model.guidance.num_classes, annotation.num_classes differ"):
        train_variant(variant(5, 4), logged.append)
    assert len(logged) == 1

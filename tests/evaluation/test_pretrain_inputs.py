"""DINO pretraining: crop sides a ViT cannot take, batches whose images are all unreadable."""
import pytest
import torch

from sgdm.config.core import ConfigError
from sgdm.features_pretrain.config import PretrainConfig
from sgdm.features_pretrain.train import pretrain_features
from tests.evaluation.helpers import TINY_VIT


class Images(torch.utils.data.Dataset):
    """``n`` random ``side`` x ``side`` images in [-1, 1]; the indices in ``bad`` read as None (a skipped file)."""

    def __init__(self, n: int, side: int = 16, bad=()):
        self.x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.bad = set(bad)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return None if i in self.bad else {"image": self.x[i], "id": str(i)}


def _fail_on_step(*args):
    pytest.fail("a training step ran before the check")


def test_a_local_crop_side_that_is_no_multiple_of_the_patch_size_names_the_fraction(tmp_path):
    """round(16 * 0.4) = 6 px local crops on a patch-4 ViT used to stop in timm's patch embedding with
    'Input height (6) should be divisible by patch size (4)', naming no setting."""
    cfg = PretrainConfig(steps=2, batch_size=4, out_dim=16, local_crop_fraction=0.4)
    out = tmp_path / "enc.pth"
    with pytest.raises(ConfigError, match=r"^prepare\.pretrain\.local_crop_fraction: local crops of 6 px .*patch "
                                          r"size 4.* 0\.25 \(4 px\) or 0\.5 \(8 px\)"):
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, out, log=lambda m: None,
                          on_step=_fail_on_step)
    assert not out.exists()


def test_an_image_side_that_is_no_multiple_of_the_patch_size_names_data_size(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=4, out_dim=16, local_crop_fraction=0.5)
    with pytest.raises(ConfigError, match=r"^data\.size: global crops of 18 px .*patch size 4.* 16 or 20"):
        pretrain_features(Images(8, side=18), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth",
                          log=lambda m: None, on_step=_fail_on_step)


def test_fitting_crop_sides_still_train(tmp_path):
    steps = []
    cfg = PretrainConfig(steps=1, batch_size=4, out_dim=16, local_crops=1, local_crop_fraction=0.25)
    pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth", log=lambda m: None,
                      on_step=lambda step, *a: steps.append(step))
    assert steps == [0]


def test_a_batch_of_only_unreadable_images_is_skipped(tmp_path):
    """A batch whose every file was skipped (on_bad_image: skip) stopped pretraining with torch's
    'stack expects a non-empty TensorList'; it is passed over, the other batches train."""
    steps = []
    cfg = PretrainConfig(steps=4, batch_size=2, out_dim=16, local_crops=1)
    pretrain_features(Images(8, bad=range(1, 8)), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth",
                      log=lambda m: None, on_step=lambda step, *a: steps.append(step))
    assert steps == [0, 1, 2, 3]


def test_a_dataset_of_only_unreadable_images_is_an_error_that_says_so(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=2, out_dim=16, local_crops=1)
    with pytest.raises(ValueError, match=r"none of the 6 images .* could be read.*validate-data"):
        pretrain_features(Images(6, bad=range(6)), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth",
                          log=lambda m: None, on_step=_fail_on_step)


def test_data_num_workers_decode_the_images_and_leave_the_encoder_unchanged(tmp_path, monkeypatch):
    """Pretraining read every image in the main process whatever data.num_workers said (a GPU waiting on
    JPEG decoding); worker processes now decode them, and the encoder is the same bit for bit."""
    from safetensors.torch import load_file

    import sgdm.features_pretrain.train as pretrain_train
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.features_pretrain.run import pretrain_from_config
    from tests.evaluation.helpers import tiny_config

    cfg = PretrainConfig(steps=3, batch_size=4, out_dim=16, local_crops=1)
    a = pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "a.safetensors", log=lambda m: None)
    b = pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "b.safetensors",
                          log=lambda m: None, num_workers=2)
    wa, wb = load_file(a), load_file(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    seen = {}
    monkeypatch.setattr(pretrain_train, "pretrain_features", lambda *a, **k: seen.update(k))
    raw = tiny_config(tmp_path, "label")
    raw["data"]["num_workers"] = 3
    pretrain_from_config(from_dict(ExperimentConfig, raw), tmp_path / "c.pth")
    assert seen["num_workers"] == 3


def test_the_batches_and_the_generator_stream_are_those_of_the_random_sampler_before():
    """The order is drawn in this process (so that workers cannot move the sampler's draws in the generator's
    stream), as torch's RandomSampler drew it: encoders made before are reproduced."""
    from torch.utils.data import DataLoader, RandomSampler

    from sgdm.features_pretrain.train import _Batches, _stack_images

    cfg = PretrainConfig(batch_size=3)
    dataset = Images(7)

    def before(generator):
        while True:
            sampler = RandomSampler(dataset, generator=generator)
            yield from DataLoader(dataset, 3, sampler=sampler, drop_last=True, collate_fn=_stack_images)

    for workers in (0, 2):
        old_g, new_g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        old, new = before(old_g), _Batches(dataset, cfg, new_g, workers)
        for _ in range(7):  # 3 epochs and a half, the augmentations drawing from the generator between batches
            assert torch.equal(next(old), next(new))
            assert torch.equal(torch.rand(2, generator=old_g), torch.rand(2, generator=new_g))


class Crash(Exception):
    pass


def _crash_at(at: int, seen: list):
    def on_step(step, *args):
        seen.append(step)
        if step == at:
            raise Crash
    return on_step


def test_an_interrupted_pretraining_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    """Pretraining had no checkpoint: a job stopped by a time limit started again from step 0. With
    checkpoint_every, a rerun continues from the last checkpoint and makes the encoder of an uninterrupted run
    (here across epochs: 2 batches of 4 per epoch of 8 images, a bad one among them)."""
    from safetensors.torch import load_file

    def run(cfg, name, **kw):
        return pretrain_features(Images(8, bad=[3]), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / name,
                                 log=lambda m: None, **kw)

    straight = load_file(run(PretrainConfig(steps=5, batch_size=4, out_dim=16, local_crops=1), "a.safetensors"))
    cfg = PretrainConfig(steps=5, batch_size=4, out_dim=16, local_crops=1, checkpoint_every=2)
    ckpt = tmp_path / "b.resume.pt"
    seen = []
    with pytest.raises(Crash):  # stopped in step 3, after the checkpoint of steps 0 and 1 (and before the next)
        run(cfg, "b.safetensors", checkpoint=ckpt, on_step=_crash_at(2, seen))
    assert ckpt.is_file() and not (tmp_path / "b.safetensors").exists()
    again = []
    resumed = load_file(run(cfg, "b.safetensors", checkpoint=ckpt, on_step=lambda step, *a: again.append(step)))
    assert seen == [0, 1, 2] and again == [2, 3, 4]
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not ckpt.exists() and not list(tmp_path.glob("*.tmp"))  # the finished run removes its checkpoint


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    cfg = PretrainConfig(steps=4, batch_size=4, out_dim=16, local_crops=1, checkpoint_every=1)
    ckpt = tmp_path / "enc.resume.pt"
    with pytest.raises(Crash):
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth", log=lambda m: None,
                          checkpoint=ckpt, on_step=_crash_at(1, []))
    other = PretrainConfig(steps=4, batch_size=4, out_dim=16, local_crops=1, checkpoint_every=1, lr=1e-3)
    with pytest.raises(ConfigError, match=r"prepare\.pretrain: .*enc\.resume\.pt .*\(prepare\.pretrain\.lr\); delete it"):
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, other, tmp_path / "enc.pth",
                          log=lambda m: None, checkpoint=ckpt, on_step=_fail_on_step)
    broken = tmp_path / "broken.resume.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"prepare\.pretrain: the checkpoint .*broken\.resume\.pt cannot be read .*delete it"):
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth", log=lambda m: None,
                          checkpoint=broken, on_step=_fail_on_step)
    # checkpoint_every itself (and the device) may change on a resume
    steps = []
    pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, PretrainConfig(**{**vars(cfg), "checkpoint_every": 3}),
                      tmp_path / "enc.pth", log=lambda m: None, checkpoint=ckpt, on_step=lambda s, *a: steps.append(s))
    assert steps == [2, 3]


def test_pretrain_from_config_checkpoints_beside_the_encoder(tmp_path, monkeypatch):
    import sgdm.features_pretrain.train as pretrain_train
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.features_pretrain.run import pretrain_from_config
    from tests.evaluation.helpers import tiny_config

    seen = {}
    monkeypatch.setattr(pretrain_train, "pretrain_features", lambda *a, **k: seen.update(k))
    raw = tiny_config(tmp_path, "label")
    pretrain_from_config(from_dict(ExperimentConfig, raw), tmp_path / "c.pth")
    assert seen["checkpoint"] is None
    raw["prepare"] = {"pretrain": {"checkpoint_every": 100}}
    pretrain_from_config(from_dict(ExperimentConfig, raw), tmp_path / "c.pth")
    assert seen["checkpoint"] == tmp_path / "c.pth.resume.pt"


def test_a_checkpoint_from_before_a_new_key_resumes_at_its_default(tmp_path):
    """A checkpoint written before prepare.pretrain.view_recipe existed holds no such key: it was refused as one of
    'other settings' although its run used the default; a key it lacks now reads at its default (as for encoders)."""
    cfg = PretrainConfig(steps=3, batch_size=4, out_dim=16, local_crops=1, checkpoint_every=1)
    ckpt = tmp_path / "enc.resume.pt"
    with pytest.raises(Crash):
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth", log=lambda m: None,
                          checkpoint=ckpt, on_step=_crash_at(0, []))
    state = torch.load(ckpt, weights_only=True)
    del state["record"]["prepare.pretrain.view_recipe"]
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"\(prepare\.pretrain\.view_recipe\); delete it"):  # not the default
        pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, PretrainConfig(**{**vars(cfg), "view_recipe": "dino"}),
                          tmp_path / "enc.pth", log=lambda m: None, checkpoint=ckpt, on_step=_fail_on_step)
    steps = []
    pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, cfg, tmp_path / "enc.pth", log=lambda m: None,
                      checkpoint=ckpt, on_step=lambda s, *a: steps.append(s))
    assert steps == [1, 2]


_LAUNCH_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                     "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES")


@pytest.mark.parametrize("env, refused", [
    ({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "WORLD_SIZE"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "pretrain", "SLURM_PROCID": "0"}, "SLURM_NTASKS"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE"),  # a process group set up by hand, as annotate joins it
    ({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "1"}, None),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "bash"}, None),  # an interactive shell on an allocation: no launch
])
def test_pretrain_features_refuses_a_launch_of_several_processes(env, refused, tmp_path, capsys, monkeypatch):
    """Under torchrun or srun every process trained the same encoder from the same seed and wrote the same file (on
    a shared disk, at the same time); the command now refuses such a launch before any work."""
    import yaml

    import sgdm.features_pretrain.train as pretrain_train
    from sgdm.cli.main import main
    from tests.evaluation.helpers import tiny_config

    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    trained = []
    monkeypatch.setattr(pretrain_train, "pretrain_features", lambda *a, **k: trained.append(a) or a[4])
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, "label")))
    code = main(["pretrain-features", str(config)])
    err = capsys.readouterr().err
    if refused is None:
        assert code == 0 and len(trained) == 1
    else:
        assert code == 2 and not trained
        assert f"config error: {refused}: pretrain-features trains in one process" in err
        assert "without the launcher" in err


_SLOW_PRETRAINING = '''
import pathlib, sys, time
import sgdm.features_pretrain.train as train
from sgdm.cli.main import main

marker, pretrain_features = pathlib.Path(sys.argv[2]), train.pretrain_features

def slow(*args, **kwargs):
    def on_step(step, *rest):
        marker.write_text(str(step))
        time.sleep(0.2)  # slow steps: the SIGTERM comes inside one
    return pretrain_features(*args, on_step=on_step, **kwargs)

train.pretrain_features = slow
sys.exit(main(["pretrain-features", sys.argv[1]]))
'''


def test_sigterm_writes_the_checkpoint_and_exits_143(tmp_path, monkeypatch):
    """A SIGTERM (a scheduler's time limit: to the whole process group, DataLoader workers included) killed
    pretraining at once, losing every step since the last checkpoint_every. With checkpoint_every set, the step in
    progress ends, the checkpoint is written, and the command exits 143 like `sgdm-ldm train`; a rerun continues
    from that step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    import sgdm.features_pretrain.train as pretrain_train
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.features_pretrain.run import pretrain_from_config
    from tests.evaluation.helpers import tiny_config

    raw = tiny_config(tmp_path, "label")
    raw["data"]["num_workers"] = 2
    raw["prepare"] = {"pretrain": dict(steps=100000, batch_size=4, warmup_steps=1, out_dim=16, hidden_dim=16,
                                       bottleneck_dim=8, local_crops=1, checkpoint_every=1000)}
    config, script, marker = tmp_path / "exp.yaml", tmp_path / "slow.py", tmp_path / "step"
    config.write_text(yaml.safe_dump(raw))
    script.write_text(_SLOW_PRETRAINING)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), str(config), str(marker)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # a guard against a hang, not a timing: wait for the third step
            if marker.is_file() and marker.read_text() not in ("", "0", "1") or proc.poll() is not None:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = int(marker.read_text())
    ckpt = tmp_path / "enc.safetensors.resume.pt"
    assert proc.returncode == 143, err
    assert ckpt.is_file() and not (tmp_path / "enc.safetensors").exists()
    assert torch.load(ckpt, weights_only=True)["step"] == last + 1  # the step the signal came in, finished
    assert f"stopped by SIGTERM at step {last + 1}" in err and str(ckpt) in err

    steps = []
    before = signal.getsignal(signal.SIGTERM)
    real = pretrain_train.pretrain_features
    monkeypatch.setattr(pretrain_train, "pretrain_features",
                        lambda *a, **k: real(*a, on_step=_crash_at(last + 1, steps), **k))
    with pytest.raises(Crash):
        pretrain_from_config(from_dict(ExperimentConfig, raw))
    assert steps == [last + 1]  # continued where the SIGTERM stopped it
    assert signal.getsignal(signal.SIGTERM) is before  # the handler of the pretraining is gone with it


_LEFT_OPEN = '''
import sys, torch
from sgdm.features_pretrain.config import PretrainConfig
from sgdm.features_pretrain.train import _Batches, pretrain_features
from tests.evaluation.test_pretrain_inputs import Images, TINY_VIT

if sys.argv[1] == "batches":  # read and left open, as a caller may
    batches = _Batches(Images(8), PretrainConfig(batch_size=2), torch.Generator().manual_seed(0), 2)
    next(batches)
else:  # stopped by an error inside a checkpointing run, whose workers ignore SIGTERM
    def fail(step, *args):
        raise RuntimeError("stop")
    pretrain_features(Images(8), "vit_tiny_patch16_224", TINY_VIT, PretrainConfig(steps=3, batch_size=2, out_dim=16,
                      local_crops=1, checkpoint_every=1), sys.argv[2] + "/enc.pth", log=lambda m: None, num_workers=2,
                      checkpoint=sys.argv[2] + "/enc.resume.pt", on_step=fail)
'''


@pytest.mark.parametrize("case, code", [("batches", 0), ("pretrain", 1)])
def test_a_process_with_pretraining_workers_exits(case, code, tmp_path):
    """DataLoader workers that ignore SIGTERM kept the interpreter from exiting (multiprocessing's exit handler
    terminates daemonic children with SIGTERM, then joins them): the workers ignore it only inside pretrain_features,
    which shuts them down on the way out, also after an error."""
    import os
    import subprocess
    import sys

    script = tmp_path / "left_open.py"
    script.write_text(_LEFT_OPEN)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script), case, str(tmp_path)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)  # a guard against the hang, not a timing
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process did not exit ({case})")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == code, err

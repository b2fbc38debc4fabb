"""train-autoencoder: what it checks before any work, and its training step."""
from __future__ import annotations

import pytest

from sgdm.cli.main import main
from tests.training.helpers import tiny_config, write_config


def _ae_config(tmp_path, **autoencoder):
    ae = {"checkpoint": str(tmp_path / "ae.ckpt"), "loss": {"perceptual_weight": 0.0, "disc_start": 2}}
    ae.update(autoencoder)
    return tiny_config(tmp_path, model={"guidance": {"kind": "none", "num_classes": 0, "drop_prob": 0.0},
                                        "autoencoder": ae}, train={"max_steps": 2})


def test_new_run_refuses_to_overwrite_an_existing_checkpoint(tmp_path, capsys):
    """A config that names a downloaded first stage (the paper configs' checkpoints/kl-f8.ckpt) must not
    have it replaced by a newly trained autoencoder at the end of the run."""
    path = write_config(tmp_path, _ae_config(tmp_path))
    (tmp_path / "ae.ckpt").write_bytes(b"pretrained weights")
    assert main(["train-autoencoder", str(path), "run.name=ae"]) == 2
    err = capsys.readouterr().err
    assert "config error: model.autoencoder.checkpoint: " in err and "ae.ckpt already exists" in err, err
    assert (tmp_path / "ae.ckpt").read_bytes() == b"pretrained weights"
    assert not (tmp_path / "runs" / "ae").exists()  # refused before the run directory is written


@pytest.mark.parametrize("key", ["vgg16_weights", "lpips_heads"])
def test_missing_lpips_file_is_a_config_error_before_any_work(tmp_path, capsys, key):
    """Not a traceback from inside the loss after the dataset is scanned and the run directory written."""
    loss = {"perceptual_weight": 1.0, "vgg16_weights": str(tmp_path / "vgg16.pth"), "disc_start": 2}
    if key == "lpips_heads":
        (tmp_path / "vgg16.pth").write_bytes(b"")
        loss["lpips_heads"] = str(tmp_path / "nohead.pth")
    path = write_config(tmp_path, _ae_config(tmp_path, loss=loss))
    assert main(["train-autoencoder", str(path), "run.name=ae"]) == 2
    err = capsys.readouterr().err
    assert f"config error: model.autoencoder.loss.{key}: " in err and "is not a file" in err, err
    assert not (tmp_path / "runs" / "ae").exists()


def test_each_rank_draws_its_slice_of_the_global_posterior_noise(generator):
    """Every rank seeds the step's generator alike: drawing only its own B samples gave all ranks the
    same noise (and several devices other latents than one). Likewise for the micro-batches of an
    accumulated step: micro-batch m of rank r is part m * world_size + r of the step's batch."""
    import torch

    from sgdm.models.autoencoder import AutoencoderKL
    from sgdm.training.autoencoder import posterior_sample
    from tests.models.helpers import randomize_, tiny_autoencoder_config

    ae = randomize_(AutoencoderKL(tiny_autoencoder_config()), generator, std=0.1).eval()
    x = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        one_device = posterior_sample(ae.encode(x), torch.Generator().manual_seed(7))
        ranks = [posterior_sample(ae.encode(x[2 * r:2 * r + 2]), torch.Generator().manual_seed(7), 4,
                                  torch.arange(2 * r, 2 * r + 2)) for r in range(2)]
        # accumulate 2 on 2 ranks: micro-batch m of rank r holds image 2 * m + r (row m * G + slot, G = 2)
        parts = [posterior_sample(ae.encode(x[2 * m + r:2 * m + r + 1]), torch.Generator().manual_seed(7), 4,
                                  torch.tensor([2 * m + r])) for m in range(2) for r in range(2)]
        # image 1 dropped as unreadable: images 2 and 3 keep their own rows
        dropped = posterior_sample(ae.encode(x[[0, 2, 3]]), torch.Generator().manual_seed(7), 4,
                                   torch.tensor([0, 2, 3]))
        posterior = ae.encode(x)
    torch.testing.assert_close(torch.cat(ranks), one_device)
    torch.testing.assert_close(torch.cat(parts), one_device)
    torch.testing.assert_close(dropped, one_device[[0, 2, 3]])
    noise = (one_device - posterior.mean) / posterior.std
    assert not torch.allclose(noise[:2], noise[2:])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_continues_exactly_with_dropout_and_the_discriminator(tmp_path):
    """Straight to step 2 == step 1 then --resume: weights, discriminator (BatchNorm statistics), logvar,
    both optimisers. model.autoencoder.dropout drew from the global RNG, which a resume does not restore."""
    import torch

    from sgdm.config.schema import load_experiment
    from sgdm.training.autoencoder import train_autoencoder

    cfg = _ae_config(tmp_path, dropout=0.3, loss={"perceptual_weight": 0.0, "disc_start": 1, "disc_channels": 8,
                                                  "disc_num_layers": 2})
    cfg["train"].update(checkpoint_every=1)
    path = write_config(tmp_path, cfg)
    runs = {"straight": [("run.name=straight", False)],
            "resumed": [("run.name=resumed", False, "train.max_steps=1"), ("run.name=resumed", True)]}
    for name, segments in runs.items():
        for overrides, resume, *more in segments:
            c = load_experiment(path, [overrides, f"model.autoencoder.checkpoint={tmp_path / name}.ckpt", *more])
            torch.manual_seed(len(more))  # whatever the global RNG holds when a segment starts
            assert train_autoencoder(c, resume=resume) == 0
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoints" / "step-00000002.ckpt", weights_only=False)
            for n in runs)
    assert a["sgdm"] == b["sgdm"] == {"step": 2}
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]) or key.endswith("scale_factor"), key
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(value, sb["state"][index][name]), f"optimizer state {index}.{name}"


def test_a_configured_scale_factor_is_refused(tmp_path, capsys):
    """The paper configs fix LDM's factor for LDM's kl-f8 (0.22765929 for Churches); training a new
    autoencoder from such a config gave the diffusion run that factor for latents of another std."""
    path = write_config(tmp_path, _ae_config(tmp_path, scale_factor=0.22765929))
    assert main(["train-autoencoder", str(path), "run.name=ae"]) == 2
    err = capsys.readouterr().err
    assert "config error: model.autoencoder.scale_factor: 0.22765929 is set" in err and "to null" in err, err
    assert not (tmp_path / "runs" / "ae").exists() and not (tmp_path / "ae.ckpt").exists()

"""Every bad input to SelfGuidedPipeline names the argument (or file) that is wrong."""
import pytest
import torch
from safetensors.torch import save_file

from sgdm.diffusion.samplers import logsnr_timesteps
from sgdm.models.unet import UNet
from sgdm.pipeline import SelfGuidedPipeline
from tests.pipeline.helpers import K, tiny_config, tiny_pipeline


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_pipeline(kind) for kind in ("none", "label", "box", "mask")}


def _call(pipe, n=2, **kwargs):
    kwargs.setdefault("num_steps", 2)
    kwargs.setdefault("output_type", "latent")
    return pipe(n, progress=False, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("kind, kwargs, match", [
    ("label", {"cluster": K}, rf"cluster: id {K} is outside \[0, {K}\)"),
    ("label", {"cluster": [0, -1]}, r"cluster: id -1 is outside"),
    ("label", {"cluster": [0, 1, 2]}, "cluster: got 3 items for num_images=2"),
    ("label", {"cluster": 0.5}, "cluster: expected integer ids"),
    ("label", {"box": [0, 0, 1, 1]}, "box: this model has 'label' guidance"),
    ("label", {"mask": torch.zeros(16, 16, dtype=torch.long)}, "mask: this model has 'label' guidance"),
    ("none", {"cluster": 1}, "cluster: this model has 'none' guidance.*no guidance inputs"),
    ("none", {"guidance_scale": 2.0}, "guidance_scale: this model is unguided"),
    ("box", {"box": [0, 0, 1, 1]}, "cluster: box guidance .* takes a box together with its cluster id"),
    ("box", {"cluster": 1}, "box: box guidance"),
    ("box", {"cluster": 1, "box": [0.5, 0, 0.2, 1]}, r"^box: expected normalized xyxy .*got \[0.5, 0.0, 0.2, 1.0\]$"),
    ("box", {"cluster": 1, "box": [0, 0, 1, 1.5]}, r"^box: expected normalized xyxy"),
    ("box", {"cluster": [1, 2], "box": [[0, 0, 1, 1], [0, 0, 1, 1.5]]}, r"^box\[1\]: expected normalized xyxy"),
    ("box", {"cluster": 1, "box": torch.zeros(16, 24, dtype=torch.bool)}, r"box: size \(16, 24\) does not fit"),
    ("box", {"cluster": 1, "box": torch.full((16, 16), 0.5)}, "box: a box mask must be binary"),
    # an empty box with a cluster id was sampled silently, a condition training never shows
    ("box", {"cluster": 1, "box": torch.zeros(16, 16, dtype=torch.bool)}, r"^box: the box mask is empty"),
    ("box", {"cluster": [1, 2], "box": torch.stack([torch.ones(16, 16), torch.zeros(16, 16)]).bool()},
     r"^box\[1\]: the box mask is empty"),
    ("box", {"cluster": 1, "box": torch.zeros(2, 2, 16, 16)}, "box: expected xyxy"),
    ("box", {"cluster": 1, "mask": torch.zeros(16, 16, dtype=torch.long)}, "mask: this model has 'box' guidance"),
    ("mask", {"mask": torch.zeros(16, 12, dtype=torch.long)}, r"mask: size \(16, 12\) does not fit the 16x16"),
    ("mask", {"mask": torch.full((16, 16), K, dtype=torch.long)}, rf"mask: class id {K} is outside"),
    ("mask", {"mask": torch.zeros(K + 1, 16, 16)}, rf"mask: a channel mask must be \[K, H, W\].*K={K}"),
    ("mask", {"mask": torch.full((K, 8, 8), 2.0)}, r"mask: channel values must lie in \[0, 1\]"),
    ("mask", {"mask": torch.zeros(3, 16, 16, dtype=torch.long)}, "mask: got 3 items for num_images=2"),
    ("mask", {"mask": torch.zeros(2, 2, 2, 16, 16, dtype=torch.long)}, r"mask: a class-id map must be"),
    ("mask", {"cluster": 1}, "cluster: this model has 'mask' guidance .*; it takes mask$"),
    ("label", {"num_steps": 0}, "num_steps: expected a positive integer, got 0"),
    ("label", {"num_steps": -5}, "num_steps: expected a positive integer, got -5"),
    ("label", {"num_steps": 2.5}, "num_steps: expected a positive integer"),
    ("label", {"num_steps": 51}, "num_steps: at most the 50 training timesteps"),
    ("label", {"sampler": "euler_a"}, "sampler: unknown sampler 'euler_a'"),
    ("label", {"eta": -1.0}, r"eta: expected a number in \[0, 1\]"),
    ("label", {"eta": 1.5}, r"eta: expected a number in \[0, 1\]"),
    ("label", {"spacing": "uniform"}, "spacing: expected one of linspace, leading, trailing, logsnr"),
    ("box", {"cluster": 1, "box": [float("nan"), 0, 1, 1]}, r"box: expected normalized xyxy"),
    ("box", {"cluster": 1, "box": [0.5, 0.5, 0.5, 0.9]}, r"box: expected normalized xyxy .*x0 < x1"),
    # a float [N, 4] is boxes: four zero-area boxes at (1, 1), not a 4-pixel-wide mask
    ("box", {"cluster": 1, "box": torch.ones(4, 4)}, "got 4 items for num_images=2|must be bool or integer"),
    ("mask", {"mask": torch.full((K, 8, 8), float("nan"))}, r"mask: channel values must lie in \[0, 1\]"),
    ("label", {"eta": 0.5, "sampler": "dpmpp_2m"}, "eta: only the ddim sampler uses eta"),
    ("label", {"cluster": 0, "guidance_scale": float("inf")}, "guidance_scale: expected a finite number"),
    ("label", {"batch_size": 0}, "batch_size: expected a positive integer"),
    ("label", {"output_type": "tensor"}, "output_type: expected one of pil, pt, np, latent"),
])
def test_bad_call_names_the_argument(pipes, kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(pipes[kind], **kwargs)


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_unsigned_class_maps_and_clusters_are_ids(pipes, dtype):
    """A 16-bit PNG opened with PIL (mode I;16) or a numpy uint array is a class map like any integer one."""
    import numpy as np

    ids = np.zeros((16, 16), dtype)
    ids[4:12, 4:12] = 2
    want = _call(pipes["mask"], mask=torch.from_numpy(ids.astype(np.int64)))
    torch.testing.assert_close(_call(pipes["mask"], mask=ids), want)
    torch.testing.assert_close(_call(pipes["mask"], mask=torch.from_numpy(ids)), want)
    torch.testing.assert_close(_call(pipes["label"], cluster=np.array([1, 2], dtype)),
                               _call(pipes["label"], cluster=[1, 2]))
    ids[0, 0] = K
    with pytest.raises(ValueError, match=rf"mask: class id {K} is outside"):
        _call(pipes["mask"], mask=ids)


def test_a_pil_16_bit_class_map_is_read(pipes):
    import numpy as np
    from PIL import Image

    ids = np.zeros((16, 16), np.uint16)
    ids[4:12, 4:12] = 2
    image = Image.fromarray(ids)
    assert image.mode == "I;16"
    torch.testing.assert_close(_call(pipes["mask"], mask=image), _call(pipes["mask"], mask=ids.astype(np.int64)))


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_image_as_mask_is_named(pipes, channels):
    """An RGB(A) picture of a class map ([H, W, C]) is not read as H maps C pixels wide."""
    import numpy as np
    from PIL import Image

    picture = np.zeros((16, 16, channels), np.uint8)
    for mask in (picture, Image.fromarray(picture, "RGBA" if channels == 4 else "RGB")):
        with pytest.raises(ValueError, match=rf"^mask: got shape \(16, 16, {channels}\), a colour .* \[H, W\]"):
            _call(pipes["mask"], mask=mask)
    # maps 3 pixels wide that are no picture of the image stay a size error
    with pytest.raises(ValueError, match=r"mask: size \(16, 3\) does not fit"):
        _call(pipes["mask"], mask=np.zeros((2, 16, 3), np.int64))


def test_numpy_and_tensor_scalars_are_numbers(pipes):
    """Values from np.arange, numpy sweeps or 0-d tensors work like Python numbers."""
    import numpy as np

    want = _call(pipes["label"], cluster=1, guidance_scale=2.0, num_steps=2)
    for n, steps, w in ((np.int64(2), np.int32(2), np.float32(2.0)), (torch.tensor(2), torch.tensor(2),
                                                                        torch.tensor(2.0))):
        got = _call(pipes["label"], n=n, cluster=1, guidance_scale=w, num_steps=steps)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="num_images: expected a positive integer, got True"):
        _call(pipes["label"], n=True, cluster=1)


def test_a_bool_or_integer_mask_four_pixels_wide_is_a_mask(pipes):
    from sgdm.pipeline import parse_guidance

    p = pipes["box"]
    for mask in (torch.ones(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.long)):
        inputs = parse_guidance(p.guidance, 2, p.latent_shape[1:], p.image_size, cluster=1, box=mask)
        assert inputs.boxes is None and inputs.box_masks.shape == (2, 4, 4)
        assert bool((inputs.condition(0, 2)[1] == 1).all())  # the whole image
    inputs = parse_guidance(p.guidance, 2, p.latent_shape[1:], p.image_size, cluster=1, box=[0, 0, 1, 1])
    assert inputs.box_masks is None and inputs.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2


def test_solver_defaults_come_from_the_models_sampler_config(pipes, monkeypatch):
    """Unset num_steps / sampler / eta / spacing are the model's sampler config; its eta applies
    to its own sampler only (another sampler chosen in the call runs with eta = 0)."""
    from dataclasses import replace

    from sgdm.pipeline import SelfGuidedPipeline as Pipe

    p = pipes["label"]
    seen = {}
    monkeypatch.setattr(Pipe, "_sample_batch", lambda self, gens, cond, cond_map, scale, ts, sampler, eta, cb:
                        seen.update(ts=ts.tolist(), sampler=sampler, eta=eta) or torch.zeros(len(gens), 4, 4, 4))
    monkeypatch.setattr(p, "sampler", replace(p.sampler, sampler="ddim", steps=3, eta=0.5, spacing="trailing"))
    _call(p, cluster=1, num_steps=None)
    assert seen == {"ts": [49, 32, 16], "sampler": "ddim", "eta": 0.5}
    _call(p, cluster=1, num_steps=None, sampler="ddpm")
    assert seen["sampler"] == "ddpm" and seen["eta"] == 0.0
    _call(p, cluster=1, num_steps=4, spacing="leading", eta=0.0)
    assert seen == {"ts": [37, 25, 13, 1], "sampler": "ddim", "eta": 0.0}
    # the config's spacing is for its own sampler too: another one gets its default spacing
    _call(p, cluster=1, num_steps=3, sampler="ddpm")
    assert seen["ts"] == [49, 25, 1]
    _call(p, cluster=1, num_steps=3, sampler="dpmpp_2m")
    assert seen["ts"] == logsnr_timesteps(3, p.schedule).tolist() != [49, 25, 1]
    _call(p, cluster=1, num_steps=3, sampler="dpmpp_2m", spacing="linspace")
    assert seen["ts"] == [49, 25, 1]
    _call(p, cluster=1, num_steps=3, spacing="logsnr")
    assert seen["ts"] == logsnr_timesteps(3, p.schedule).tolist() and seen["sampler"] == "ddim"
    monkeypatch.setattr(p, "sampler", replace(p.sampler, sampler="dpmpp_2m", eta=0.0, spacing=None))
    _call(p, cluster=1, num_steps=3)
    assert seen["ts"] == logsnr_timesteps(3, p.schedule).tolist() and seen["sampler"] == "dpmpp_2m"


def test_bad_num_images_and_generators(pipes):
    with pytest.raises(ValueError, match="num_images: expected a positive integer, got 0"):
        pipes["label"](0, progress=False)
    with pytest.raises(ValueError, match=r"generator: a list must hold one torch.Generator per image \(2\)"):
        pipes["label"](2, num_steps=1, generator=[torch.Generator()], progress=False)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        pipes["label"](2, num_steps=1, generator=123, progress=False)


def test_unet_that_does_not_fit_the_guidance(pipes):
    p = pipes["label"]
    with pytest.raises(ValueError, match=r"unet: built with \(cond_dim, cond_channels\) = \(0, 0\).*'label'"):
        SelfGuidedPipeline(UNet(p.unet.cfg), p.autoencoder, p.diffusion, p.guidance)


def test_from_pretrained_errors_name_the_file(pipes, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no model.safetensors there nor in"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "empty")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w.ckpt: expected a pipeline directory or a .safetensors file"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "w.ckpt")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors: not an sgdm pipeline file"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "plain.safetensors")


def test_weights_that_do_not_fit_the_stored_config(pipes, tmp_path):
    import json

    from safetensors import safe_open

    path = pipes["label"].save_pretrained(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bigger = tiny_config("label")
    bigger["model"]["unet"]["channels"] = 16
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=dict(meta, config=json.dumps(bigger)))
    with pytest.raises(ValueError, match="shape.safetensors: the unet weights do not fit the unet config"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in tensors.items() if not k.startswith("unet.out.")}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"missing.safetensors: the unet weights do not match.*missing \['out"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "missing.safetensors")
    no_ae = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    save_file(no_ae, str(tmp_path / "no_ae.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="no_ae.safetensors: holds no 'autoencoder.\\*' tensors"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "no_ae.safetensors")
    bad_cfg = tiny_config("label")
    bad_cfg["model"]["guidance"]["kind"] = "sideways"
    save_file(tensors, str(tmp_path / "cfg.safetensors"), metadata=dict(meta, config=json.dumps(bad_cfg)))
    from sgdm.config.core import ConfigError

    with pytest.raises(ConfigError, match="model.guidance.kind"):
        SelfGuidedPipeline.from_pretrained(tmp_path / "cfg.safetensors")

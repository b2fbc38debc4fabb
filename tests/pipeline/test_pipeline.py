"""SelfGuidedPipeline: determinism across batch sizes, guidance wiring, outputs, save/load."""
import numpy as np
import pytest
import torch

from sgdm.pipeline import SelfGuidedPipeline, build_condition, parse_guidance, per_image_generators
from tests.pipeline.helpers import K, tiny_pipeline

INPUTS = {
    "none": {},
    "label": {"cluster": [0, 2, 1, 2, 0]},
    "box": {"cluster": [1, 0, 2, 2, 1], "box": [[0.1, 0.2, 0.6, 0.9], [0, 0, 1, 1], [0.5, 0.5, 0.52, 0.53],
                                               [0.2, 0.0, 0.3, 1.0], [0.0, 0.4, 1.0, 0.6]]},
    "mask": {"mask": torch.randint(0, K, (5, 16, 16), generator=torch.Generator().manual_seed(4))},
}


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_pipeline(kind) for kind in INPUTS}


def _run(pipe, n=5, seed=0, **kwargs):
    kwargs.setdefault("num_steps", 4)
    return pipe(n, generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False, **kwargs)


@pytest.mark.parametrize("kind, sampler, eta", [
    ("none", "ddim", 0.0), ("label", "ddim", 0.0), ("label", "ddim", 0.8), ("label", "ddpm", 0.0),
    ("label", "dpmpp_2m", 0.0), ("box", "ddim", 0.8), ("mask", "ddpm", 0.0),
])
def test_same_seed_same_images_whatever_the_batch_size(pipes, kind, sampler, eta):
    whole = _run(pipes[kind], sampler=sampler, eta=eta, **INPUTS[kind])
    assert whole.shape == (5, 3, 16, 16) and 0 <= whole.min() and whole.max() <= 1
    for bs in (1, 3) if (kind, sampler) == ("label", "ddim") else (3,):
        split = _run(pipes[kind], sampler=sampler, eta=eta, batch_size=bs, **INPUTS[kind])
        assert (whole - split).abs().max() < 1e-4
    other = _run(pipes[kind], seed=1, sampler=sampler, eta=eta, **INPUTS[kind])
    assert (whole - other).abs().max() > 1e-3


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.8), ("ddpm", 0.0)])
def test_first_images_do_not_depend_on_num_images(pipes, sampler, eta):
    # (it compared 5 images with the same 5 images in batches of 2, not 2 images with the first of 5)
    many = _run(pipes["label"], n=5, cluster=[0, 2, 1, 2, 0], sampler=sampler, eta=eta)
    few = _run(pipes["label"], n=2, cluster=[0, 2], sampler=sampler, eta=eta)
    assert (many[:2] - few).abs().max() < 1e-4


def test_guidance_changes_images_and_w0_is_unconditional(pipes):
    pipe = pipes["label"]
    uncond = _run(pipe, n=3)
    w0 = _run(pipe, n=3, cluster=2, guidance_scale=0.0)
    assert (uncond - w0).abs().max() < 1e-5
    w1 = _run(pipe, n=3, cluster=2, guidance_scale=1.0)
    w3 = _run(pipe, n=3, cluster=2, guidance_scale=3.0)
    assert (w1 - uncond).abs().max() > 1e-3 and (w3 - w1).abs().max() > 1e-3
    default = _run(pipe, n=3, cluster=2)  # config's sampler.guidance_scale = 2.5
    assert (default - _run(pipe, n=3, cluster=2, guidance_scale=2.5)).abs().max() == 0


def test_guidance_scale_interpolates_eps_linearly(pipes):
    # One DDIM step from the same x_T is affine in eps, so w = 0.5 lands halfway between w = 0 and w = 1.
    pipe = pipes["label"]
    run = lambda w: pipe(2, cluster=1, guidance_scale=w, num_steps=1, output_type="latent", progress=False,
                         generator=torch.Generator().manual_seed(3))
    assert torch.allclose(run(0.5), (run(0.0) + run(1.0)) / 2, atol=1e-5)


def test_output_types(pipes):
    pipe, g = pipes["label"], lambda: torch.Generator().manual_seed(0)
    pt = pipe(2, cluster=1, num_steps=2, generator=g(), output_type="pt", progress=False)
    arr = pipe(2, cluster=1, num_steps=2, generator=g(), output_type="np", progress=False)
    pil = pipe(2, cluster=1, num_steps=2, generator=g(), output_type="pil", progress=False)
    latent = pipe(2, cluster=1, num_steps=2, generator=g(), output_type="latent", progress=False)
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 16, 16, 3) and arr.dtype == np.float32
    assert np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    assert np.abs(np.asarray(pil[0]) / 255.0 - arr[0]).max() <= 0.5 / 255 + 1e-6
    assert latent.shape == (2, 2, 8, 8)
    decoded = pipe.autoencoder.decode_latents(latent)
    assert torch.allclose((decoded + 1) / 2, pt, atol=1e-6)


def test_v_parameterization_samples(generator):
    pipe = tiny_pipeline("label", parameterization="v")
    assert pipe(2, cluster=0, num_steps=3, output_type="pt", progress=False, generator=generator).isfinite().all()


def test_box_xyxy_and_its_binary_mask_give_the_same_condition():
    g = tiny_pipeline("box").guidance
    xyxy = torch.tensor([0.25, 0.5, 0.75, 1.0])
    pixels = torch.zeros(16, 16, dtype=torch.bool)
    pixels[8:16, 4:12] = True
    a = build_condition(g, 2, (8, 8), (16, 16), cluster=1, box=xyxy)
    b = build_condition(g, 2, (8, 8), (16, 16), cluster=[1, 1], box=pixels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (2, 1, 8, 8) and a[1].sum() == 2 * 16


def test_mask_ids_and_channel_mask_give_the_same_condition():
    g = tiny_pipeline("mask").guidance
    ids = torch.zeros(32, 32, dtype=torch.long)
    ids[:, 16:] = 2
    ids[0, 0] = 255  # ignored pixel
    channels = torch.nn.functional.one_hot(ids.clamp(max=K - 1), K).permute(2, 0, 1).float()
    channels[:, 0, 0] = 0
    cond_a, map_a = build_condition(g, 1, (8, 8), (16, 16), mask=ids)
    cond_b, map_b = build_condition(g, 1, (8, 8), (16, 16), mask=channels)
    assert torch.equal(cond_a, torch.tensor([[1.0, 0.0, 1.0]])) and torch.equal(cond_a, cond_b)
    assert torch.equal(map_a, map_b) and map_a.shape == (1, K, 8, 8)


@pytest.mark.parametrize("kind", ["label", "box", "mask"])
def test_conditions_are_built_per_batch_from_views(pipes, kind):
    g = pipes[kind].guidance
    whole = build_condition(g, 5, (8, 8), (16, 16), **INPUTS[kind])
    inputs = parse_guidance(g, 5, (8, 8), (16, 16), **INPUTS[kind])
    for lo, hi in ((0, 2), (2, 5)):
        part = inputs.condition(lo, hi)
        for a, b in zip(whole, part):
            assert (a is None and b is None) or torch.equal(a[lo:hi], b)
    # one mask for 10 000 images is a stride-0 view until a batch needs it
    one = {"label": {"cluster": 1}, "box": {"cluster": 1, "box": torch.ones(16, 16, dtype=torch.bool)},
           "mask": {"mask": torch.zeros(16, 16, dtype=torch.long)}}[kind]
    many = parse_guidance(g, 10_000, (8, 8), (16, 16), **one)
    field = {"label": many.clusters, "box": many.box_masks, "mask": many.class_maps}[kind]
    assert field.shape[0] == 10_000 and field.stride(0) == 0


def test_numpy_and_pil_inputs_are_accepted():
    from PIL import Image

    g = tiny_pipeline("mask").guidance
    ids = np.zeros((16, 16), dtype=np.uint8)
    ids[4:, :] = 1
    ref = build_condition(g, 1, (8, 8), (16, 16), mask=torch.from_numpy(ids))
    for value in (ids, Image.fromarray(ids)):
        got = build_condition(g, 1, (8, 8), (16, 16), mask=value)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_per_image_generators():
    a = per_image_generators(torch.Generator().manual_seed(5), 3)
    b = per_image_generators(torch.Generator().manual_seed(5), 3)
    assert [torch.randn(2, generator=g).tolist() for g in a] == [torch.randn(2, generator=g).tolist() for g in b]
    given = [torch.Generator() for _ in range(3)]
    assert per_image_generators(given, 3) == given
    state = torch.random.get_rng_state()
    per_image_generators(None, 2)
    assert torch.equal(state, torch.random.get_rng_state())


def test_round_trip_directory_file_and_run_dir(pipes, tmp_path):
    pipe = pipes["box"]
    ref = _run(pipe, n=2, **{k: v[:2] for k, v in INPUTS["box"].items()})
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model.safetensors").is_file() and (tmp_path / "pipe" / "config.yaml").is_file()
    pipe.save_pretrained(tmp_path / "one.safetensors")
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    for path in (tmp_path / "pipe", tmp_path / "one.safetensors", tmp_path / "run"):
        loaded = SelfGuidedPipeline.from_pretrained(path)
        assert loaded.guidance == pipe.guidance and loaded.diffusion == pipe.diffusion
        assert loaded.config["run"] == {"name": "tiny"}
        assert float(loaded.autoencoder.scale_factor) == 0.5
        out = _run(loaded, n=2, **{k: v[:2] for k, v in INPUTS["box"].items()})
        assert torch.equal(out, ref)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.cuda
def test_cuda_is_batch_size_invariant_and_matches_cpu():
    pipe = tiny_pipeline("box")
    inputs = INPUTS["box"]
    cpu = _run(pipe, **inputs)
    pipe.to("cuda")
    # TF32 convolutions round differently per cuDNN algorithm; compare the sampling logic in fp32.
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        whole = _run(pipe, **inputs)
        split = _run(pipe, batch_size=2, **inputs)
    assert (whole - split).abs().max() < 1e-4
    assert (whole - cpu).abs().max() < 1e-3


def _old_eps_from_output(schedule, x_t, t, output, parameterization):
    """eps_from_output before the sync fix (host lookup of alpha_bar_t): the reference for bit-equality."""
    a = schedule.alpha_bar[t.cpu()].to(x_t.device)
    return ((a.sqrt().to(x_t.dtype).view(-1, 1, 1, 1) * output)
            + (1 - a).sqrt().to(x_t.dtype).view(-1, 1, 1, 1) * x_t) if parameterization == "v" else output


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_v_prediction_samples_are_bit_identical_to_the_host_lookup(sampler, monkeypatch):
    pipe = tiny_pipeline("label", parameterization="v")
    new = _run(pipe, n=3, cluster=[0, 1, 2], sampler=sampler)
    monkeypatch.setattr("sgdm.pipeline.eps_from_output", _old_eps_from_output)
    old = _run(pipe, n=3, cluster=[0, 1, 2], sampler=sampler)
    assert torch.equal(new, old)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_v_prediction_sampling_reads_nothing_back_from_the_device(sampler, monkeypatch):
    """The whole sampling loop on "meta", a device without values: every host read (int(t.min()),
    .item(), .tolist(), .cpu()) raises there, as each would be a host sync per step on a GPU.
    alpha_bar goes to the device once, not once per step."""
    from sgdm.models.conditioning import one_hot

    pipe = tiny_pipeline("label", parameterization="v").to("meta")
    copies, to = [], torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "meta" and self.dtype == torch.float64:
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    generators = per_image_generators(torch.Generator().manual_seed(0), 2)
    z = pipe._sample_batch(generators, one_hot([0, 1], K), None, 2.5, pipe.timesteps(4, "linspace"), sampler,
                           0.0, None)
    assert z.shape == (2, *pipe.latent_shape) and z.device.type == "meta"
    assert copies == [(len(pipe.schedule),)]


def test_a_soft_channel_mask_keeps_its_coverage_on_the_latent_grid():
    g = tiny_pipeline("mask").guidance
    soft = torch.zeros(K, 16, 16)
    soft[0, :, :8], soft[1, :, 8:] = 1.0, 0.5  # half-certain class 1 on the right
    soft[0, 0, 0] = 0.25
    cond, cond_map = build_condition(g, 1, (8, 8), (16, 16), mask=soft)
    assert torch.equal(cond, torch.tensor([[1.0, 0.5, 0.0]]))  # the max over the map
    assert cond_map.shape == (1, K, 8, 8) and cond_map[0, 1, :, 4:].eq(0.5).all()
    assert cond_map[0, 0, 0, 0] == pytest.approx((0.25 + 3) / 4)  # the area of the 2x2 cell

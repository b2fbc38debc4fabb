"""The sampling API: precision, memory, input checks and loading, each found broken once."""
import copy
import json

import pytest
import torch

from sgdm.pipeline import SelfGuidedPipeline
from tests.models.helpers import randomize_
from tests.pipeline.helpers import tiny_config, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("label")


def _run(p, n=2, seed=0, **kwargs):
    kwargs.setdefault("num_steps", 4)
    kwargs.setdefault("output_type", "pt")
    return p(n, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_cpu_autocast_samples_with_every_sampler(pipe, sampler):
    """Under bf16 autocast the UNet returns bf16 eps beside float32 latents: the default DDIM sampler
    stopped with 'guided_ddim_step: eps_cond has dtype torch.bfloat16 but x_t has torch.float32'."""
    want = _run(pipe, cluster=1, sampler=sampler)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(pipe, cluster=1, sampler=sampler)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1


def test_a_bf16_pipeline_keeps_the_sampler_state_in_float32():
    """pipe.to(dtype=bf16) held x_t itself in bf16: each of the paper's 250 DDIM steps rounded the
    latents to 8 bits of mantissa, 12% (relative) away from float32 where a float32 state is 0.06%."""
    cfg = tiny_config("label")
    cfg["diffusion"]["timesteps"] = 1000
    ref = SelfGuidedPipeline.from_config(cfg)
    randomize_(ref.unet, torch.Generator().manual_seed(0), std=0.2)
    half = copy.deepcopy(ref).to(dtype=torch.bfloat16)
    states = []
    run = lambda p: p(2, cluster=1, num_steps=250, progress=False, output_type="latent",  # noqa: E731
                      generator=torch.Generator().manual_seed(0))
    want, got = run(ref), run(half)
    assert got.dtype == torch.float32 and ((got - want).norm() / want.norm()) < 0.01
    half._sample_batch([torch.Generator()], None, None, 1.0, half.timesteps(2, "linspace"), "ddim", 0.0,
                       lambda i, t, x, x0: states.append((x.dtype, x0.dtype)))
    assert states == [(torch.float32, torch.float32)] * 2
    assert next(half.unet.parameters()).dtype == torch.bfloat16  # the network itself still runs in bf16


def test_each_batch_leaves_the_device_before_the_next_is_sampled(pipe, monkeypatch):
    """All N decoded images stayed on the sampling device until the end (torch.cat of every batch, then
    .cpu()): 50 000 images of 256 px are 39 GB of GPU memory. Each batch now goes to the CPU when done."""
    events, sample, cpu = [], SelfGuidedPipeline._sample_batch, torch.Tensor.cpu
    monkeypatch.setattr(SelfGuidedPipeline, "_sample_batch",
                        lambda self, *a: events.append("sample") or sample(self, *a))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: events.append("cpu") or cpu(self, *a, **k))
    for output_type in ("pt", "latent"):
        events.clear()
        _run(pipe, n=3, batch_size=1, cluster=1, num_steps=1, output_type=output_type)
        assert events[:4] == ["sample", "cpu", "sample", "cpu"], (output_type, events)


@pytest.mark.cuda
def test_cuda_memory_does_not_grow_with_the_number_of_images():
    pipe = tiny_pipeline("label").to("cuda")
    peaks = []
    for n in (2, 16):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(pipe, n=n, batch_size=2, cluster=1, num_steps=1)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] <= peaks[0] * 1.1 + 4096, peaks


@pytest.mark.parametrize("cluster", [torch.tensor([[0, 1, 0]]), [[1], [2], [0]]])
def test_a_cluster_of_more_than_one_dimension_is_refused(pipe, cluster):
    """A one-hot row [[0, 1, 0]] was flattened into three cluster ids 0, 1, 0 for three images."""
    with pytest.raises(ValueError, match=r"^cluster: expected one id or one id per image \(\[N\]\), got shape"):
        _run(pipe, n=3, cluster=cluster)


def test_a_guidance_scale_without_any_condition_is_refused(pipe):
    """pipe(8, guidance_scale=4) with no cluster sampled unconditional images, where w does nothing."""
    with pytest.raises(ValueError, match="^guidance_scale: no cluster given, so the samples are unconditional"):
        _run(pipe, guidance_scale=4.0)
    box = tiny_pipeline("box")
    with pytest.raises(ValueError, match="^guidance_scale: no cluster and box given"):
        _run(box, guidance_scale=0.0)
    assert _run(pipe).shape == (2, 3, 16, 16)  # unconditional with the config's w: fine


def test_too_many_steps_from_the_config_say_so(pipe, monkeypatch):
    """The model's sampler.steps above T was reported as if the caller had passed num_steps."""
    from dataclasses import replace

    monkeypatch.setattr(pipe, "sampler", replace(pipe.sampler, steps=60))
    with pytest.raises(ValueError, match=r"num_steps: at most the 50 training timesteps, got 60 \(the model's "
                                         r"sampler.steps; choose fewer\)"):
        _run(pipe, cluster=1, num_steps=None)
    with pytest.raises(ValueError, match="got 51$"):
        _run(pipe, cluster=1, num_steps=51)


@pytest.mark.parametrize("cut", [20, 300, -100])
def test_a_damaged_safetensors_file_is_an_error_naming_it(pipe, tmp_path, cut):
    """A truncated or overwritten file was a SafetensorError traceback, from the CLI too."""
    from sgdm.cli.main import main

    data = pipe.save_pretrained(tmp_path / "ok.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="bad.safetensors: cannot be read as a safetensors file"):
        SelfGuidedPipeline.from_pretrained(bad)
    assert main(["sample", str(bad), "-n", "1", "--steps", "1", "-o", str(tmp_path / "never.png")]) == 1


def _rewrite(path, out, **meta):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata=dict(old, **meta))
    return out


def test_another_format_version_or_a_non_object_config_is_refused(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match=r"v2.safetensors: pipeline format_version '2', but this sgdm reads "
                                         r"version '1'"):
        SelfGuidedPipeline.from_pretrained(_rewrite(path, tmp_path / "v2.safetensors", format_version="2"))
    with pytest.raises(ValueError, match="list.safetensors: the config in its metadata is a JSON list"):
        SelfGuidedPipeline.from_pretrained(_rewrite(path, tmp_path / "list.safetensors", config=json.dumps([1])))


def test_from_pretrained_does_not_initialise_the_weights_it_loads(pipe, tmp_path, monkeypatch):
    """The modules were built and randomly initialised, then overwritten: half of the load time of a
    323M-parameter UNet. They are now built without storage and take the file's tensors."""
    pipe.save_pretrained(tmp_path / "p")
    half = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    devices, reset = [], torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: devices.append(self.weight.device.type) or reset(self))
    loaded = SelfGuidedPipeline.from_pretrained(tmp_path / "p")
    assert devices and set(devices) == {"meta"}
    for mine, theirs in ((loaded.unet, pipe.unet), (loaded.autoencoder, pipe.autoencoder)):
        state = mine.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in theirs.state_dict().items())
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    # a bf16 file loads as float32 unless a dtype is asked for, as before
    assert {v.dtype for v in SelfGuidedPipeline.from_pretrained(tmp_path / "bf16").unet.state_dict().values()} == {
        torch.float32}
    assert torch.equal(_run(loaded, cluster=1), _run(pipe, cluster=1))


def _training_module(tmp_path, device="cpu"):
    """A run's config and a stand-in for its training module: the EMA UNet and the first stage."""
    from types import SimpleNamespace

    from sgdm.config.core import from_dict, to_dict
    from sgdm.config.schema import ExperimentConfig
    from tests.training.helpers import tiny_config as training_config

    cfg = from_dict(ExperimentConfig, training_config(tmp_path))
    built = SelfGuidedPipeline.from_config(to_dict(cfg))
    randomize_(built.unet, torch.Generator().manual_seed(1), std=0.2)
    built.autoencoder.scale_factor.fill_(0.5)
    return cfg, SimpleNamespace(ema=built.unet.to(device), first_stage=built.autoencoder.to(device))


def test_export_builds_the_pipeline_without_copying_the_ema_on_its_device(tmp_path, monkeypatch):
    """export_pipeline deep-copied the EMA UNet and the first stage where they trained (a GPU: one
    more copy of the model there at the end of a run) before moving the copies to the CPU."""
    from sgdm.training.export import export_pipeline

    cfg, module = _training_module(tmp_path)
    devices, reset = [], torch.nn.Conv2d.reset_parameters
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters",
                        lambda self: devices.append(self.weight.device.type) or reset(self))
    file = export_pipeline(cfg, module, tmp_path / "pipeline")
    assert devices and set(devices) == {"meta"}
    loaded = SelfGuidedPipeline.from_pretrained(file)
    for mine, theirs in ((loaded.unet, module.ema), (loaded.autoencoder, module.first_stage)):
        assert all(torch.equal(v, mine.state_dict()[k]) for k, v in theirs.state_dict().items())
    ema = dict(module.ema.named_parameters())
    first = next(iter(ema))
    ema[first].data.add_(1.0)  # the export holds copies, not the training module's tensors
    assert not torch.equal(loaded.unet.state_dict()[first], ema[first])


@pytest.mark.cuda
def test_export_from_the_gpu_allocates_nothing_there(tmp_path):
    from sgdm.training.export import export_pipeline

    cfg, module = _training_module(tmp_path, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    export_pipeline(cfg, module, tmp_path / "pipeline")
    assert torch.cuda.max_memory_allocated() == before


def test_a_class_maps_present_classes_come_without_a_full_resolution_one_hot(monkeypatch):
    """The multi-hot of a mask-guided batch was the max of a [b, K, H, W] float one-hot at image
    resolution (64 maps of 256 px, K = 27: 453 MB and 6.9 s per batch); now a scatter of the ids."""
    from sgdm.models import conditioning
    from sgdm.pipeline import parse_guidance

    g = tiny_pipeline("mask").guidance
    ids = torch.randint(0, 3, (4, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ids[0] = 255  # all ignored: nothing present
    ids[1] = 0
    ids[1, 5, 7] = 2  # one pixel of class 2: present, though it vanishes on the 8x8 latent grid
    sizes, one_hot = [], conditioning.class_map_one_hot
    monkeypatch.setattr("sgdm.pipeline.class_map_one_hot",
                        lambda m, k, size=None, **kw: sizes.append(size) or one_hot(m, k, size=size, **kw))
    cond, cond_map = parse_guidance(g, 4, (8, 8), (16, 16), mask=ids).condition(0, 4)
    assert sizes == [(8, 8)]
    assert torch.equal(cond, conditioning.multi_hot(one_hot(ids, 3))) and cond.dtype == torch.float32
    assert cond[0].sum() == 0 and cond[1].tolist() == [1.0, 0.0, 1.0] and cond_map[1, 2].sum() == 0


@pytest.mark.parametrize("box", [[[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]], torch.tensor([[0, 0, 1, 1]] * 2)])
def test_integer_boxes_are_told_to_be_floats(box):
    """[[0, 0, 1, 1]] (whole-image boxes in integers) was read as a 1x4-pixel mask: 'box: size (1, 4) does
    not fit the 16x16 output images', which says nothing of boxes."""
    with pytest.raises(ValueError, match=r"^box: got integers of shape \(\d, 4\); boxes \[N, 4\] are normalized "
                                         r"xyxy floats \(write 1.0, not 1\)"):
        _run(tiny_pipeline("box"), cluster=1, box=box)
    assert _run(tiny_pipeline("box"), cluster=1, box=torch.as_tensor(box).float()).shape == (2, 3, 16, 16)


def test_the_cli_says_flags_where_the_pipeline_names_parameters(pipe, tmp_path, capsys):
    from sgdm.cli.main import main

    pipe.save_pretrained(tmp_path / "p")
    assert main(["sample", str(tmp_path / "p"), "-w", "3", "-n", "1", "--steps", "1", "-o", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sgdm-ldm sample: error: --guidance-scale: no cluster given, so the samples are unconditional")
    assert "leave --guidance-scale unset" in err and "guidance_scale" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_one_generator_repeated_in_the_list_is_refused(pipe):
    """[g] * n made the images take turns drawing from g, so they changed with batch_size (DDPM: by 6.7)."""
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"^generator: items 0 and 2 are the same torch.Generator"):
        pipe(3, cluster=1, num_steps=1, progress=False, generator=[g, torch.Generator(), g])
    distinct = [torch.Generator().manual_seed(s) for s in range(3)]
    assert len(pipe(3, cluster=1, num_steps=1, progress=False, generator=distinct)) == 3


def test_weights_loaded_under_inference_mode_can_still_be_trained(pipe, tmp_path):
    """Weights taken as they were read (no copy) were inference tensors when loaded inside
    torch.inference_mode: fine-tuning the loaded UNet later failed in backward."""
    from sgdm.models.conditioning import one_hot

    pipe.save_pretrained(tmp_path / "p")
    with torch.inference_mode():
        loaded = SelfGuidedPipeline.from_pretrained(tmp_path / "p", dtype=torch.float32)
        also = SelfGuidedPipeline.from_pretrained(tmp_path / "p", dtype=torch.float64)
    for p in (loaded, also):
        assert not any(v.is_inference() for m in (p.unet, p.autoencoder) for v in m.state_dict().values())
    dtype = next(loaded.unet.parameters()).dtype
    loaded.unet(torch.randn(1, *loaded.latent_shape, dtype=dtype), torch.tensor([3]), one_hot([1], 3), None).sum().backward()
    assert all(p.grad is not None for p in loaded.unet.parameters() if p.requires_grad)


def test_save_pretrained_metadata_adds_entries_but_cannot_replace_the_format(pipe, tmp_path):
    from safetensors import safe_open

    file = pipe.save_pretrained(tmp_path / "p.safetensors", metadata={"step": "7"})
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["step"] == "7" and f.metadata()["format"] == "sgdm.pipeline"
    for bad in ({"format": "x"}, {"config": "{}"}, {"step": 7}):
        with pytest.raises(ValueError, match="^metadata: expected str -> str entries other than format"):
            pipe.save_pretrained(tmp_path / "q.safetensors", metadata=bad)
    assert not (tmp_path / "q.safetensors").exists()


def test_save_pretrained_on_a_full_disk_keeps_the_saved_pipeline(tmp_path, monkeypatch):
    """The weights went to a fixed '<name>.tmp' without fsync, and config.yaml was written in place: a
    failed save could leave a torn config.yaml, and the error named no file."""
    import errno

    import safetensors.torch

    pipe = tiny_pipeline("label")
    saved = pipe.save_pretrained(tmp_path / "p")
    before = {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()}

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"could not write {saved}: No space left on device"):
        pipe.save_pretrained(tmp_path / "p")
    assert {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()} == before  # no leftover, nothing torn

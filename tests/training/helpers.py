"""Tiny experiment configs for training tests: 32 px shapes, a 2-level autoencoder and UNet."""
from __future__ import annotations

import copy
import pathlib

import yaml

TINY = {
    "run": {"name": "tiny", "seed": 3},
    "data": {"dataset": "shapes", "size": 32, "num_workers": 0,
             "shapes": {"num_images": 24, "num_val_images": 4, "image_size": 32}},
    "model": {
        "autoencoder": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4, "resolution": 32,
                        "embed_dim": 2, "z_channels": 2},
        "unet": {"in_channels": 2, "out_channels": 2, "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_resolutions": [8], "num_heads": 2, "norm_groups": 4, "image_size": 16},
        "guidance": {"kind": "label", "source": "self", "num_classes": 3, "drop_prob": 0.3},
    },
    "diffusion": {"timesteps": 100},
    "sampler": {"steps": 4},
    "annotation": {"granularity": "label", "num_classes": 3},
    "eval": {"n": 4, "batch_size": 2, "steps": 4},
    "train": {"batch_size": 4, "max_steps": 8, "lr": 1.0e-3, "warmup_steps": 3, "checkpoint_every": 2,
              "keep_checkpoints": 10, "ema_decay": 0.99, "logger": "none", "progress_bar": False,
              "sample_every": 0, "sample_steps": 2, "sample_per_row": 2, "accelerator": "cpu",
              "export_pipeline": False},
}


def tiny_config(tmp_path: pathlib.Path, **sections) -> dict:
    """TINY with run.dir, the shapes cache and the annotation store under tmp_path; ``sections`` merged in."""
    cfg = copy.deepcopy(TINY)
    cfg["run"]["dir"] = str(tmp_path / "runs")
    cfg["data"]["shapes"]["cache_dir"] = str(tmp_path / "shapes")
    cfg["annotation"]["store"] = str(tmp_path / "store")
    for name, values in sections.items():
        _merge(cfg.setdefault(name, {}), values)
    return cfg


def _merge(into: dict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def write_config(tmp_path: pathlib.Path, cfg: dict, name: str = "config.yaml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_label_store(cfg_dict: dict, num_classes: int = 3) -> None:
    """A label store for the tiny shapes dataset: cluster = index mod K; its manifest records the
    data it was made from, as ``sgdm-ldm annotate`` writes it."""
    import torch

    from sgdm.annotation.store import ids_hash, write_store
    from sgdm.config.core import to_dict
    from sgdm.config.schema import load_experiment
    from sgdm.data import build_dataset

    cfg = load_experiment(None, [f"{k}={v}" for k, v in _flatten(cfg_dict)])
    dataset = build_dataset(cfg.data, train=False)
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    write_store(cfg.annotation.store, ids, {"cluster": torch.arange(len(ids)) % num_classes},
                granularity="label", num_classes=num_classes,
                extra={"dataset": {"config": to_dict(cfg.data), "ids_sha256": ids_hash(dataset.ids)}})


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def label_workdir(tmp_path_factory, name: str):
    """Body of a module-scoped fixture: a temporary dir with the tiny label store, trained in with one
    intra-op thread (a parallel reduction's float order depends on the thread count; bit-identical
    comparisons need the same)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp(name)
    make_label_store(tiny_config(tmp))
    yield tmp
    torch.set_num_threads(threads)


def run_checkpoint(cfg: dict, step: int) -> dict:
    """The checkpoint of step ``step`` of the run of config dict ``cfg``."""
    from sgdm.training.checkpoint import checkpoint_name

    return load_checkpoint(pathlib.Path(cfg["run"]["dir"]) / cfg["run"]["name"] / "checkpoints" / checkpoint_name(step))


def run_in_process(cfg_dict: dict, resume: bool = False, callbacks=()) -> int:
    from sgdm.config.core import from_dict
    from sgdm.config.schema import ExperimentConfig
    from sgdm.training.run import train

    return train(from_dict(ExperimentConfig, cfg_dict), resume=resume, callbacks=callbacks)


def cli_command(config_path: pathlib.Path, *args: str, command: str = "train") -> list[str]:
    import sys

    return [sys.executable, "-m", "sgdm.cli.main", command, str(config_path), *args]


def load_checkpoint(path: pathlib.Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical weights, EMA, optimiser and scheduler state, and step counters."""
    import torch

    assert a["sgdm"] == b["sgdm"]
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        other = b["state_dict"][key]
        assert torch.equal(value, other), \
            f"state_dict[{key!r}] differs (max abs diff {(value.double() - other.double()).abs().max().item():.3g})"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    sa, sb = a["optimizer_states"][0], b["optimizer_states"][0]
    assert sa["param_groups"] == sb["param_groups"]
    for index, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][index][name]), f"optimizer state {index}.{name} differs"

"""A tiny run directory made without training: fresh pipeline weights, a store of annotations."""
import pathlib

import torch

from sgdm.config.core import dump_yaml, from_dict, to_dict

TINY_VIT = dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)


def tiny_config(tmp: pathlib.Path, kind: str = "label", **extra) -> dict:
    k = 3
    cfg = {
        "run": {"dir": str(tmp / "runs"), "name": f"tiny-{kind}"},
        "data": {"dataset": "shapes", "size": 16, "num_workers": 0,
                 "shapes": {"num_images": 12, "num_val_images": 4, "image_size": 16, "cache_dir": str(tmp / "shapes")}},
        "model": {
            "autoencoder": {"resolution": 16, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_groups": 4,
                            "embed_dim": 2, "z_channels": 2, "scale_factor": 1.0},
            "unet": {"in_channels": 2, "out_channels": 2, "channels": 16, "channel_mult": [1], "num_res_blocks": 1,
                     "attention_resolutions": [], "num_heads": 2, "norm_groups": 8, "image_size": 8},
            "guidance": {"kind": kind, "source": "self", "num_classes": 0 if kind == "none" else k,
                         "drop_prob": 0.0 if kind == "none" else 0.1},
        },
        "diffusion": {"timesteps": 100},
        "sampler": {"steps": 2},
        "annotation": {"store": str(tmp / f"store-{kind}"), "granularity": "label" if kind == "none" else kind,
                       "backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_VIT,
                       "weights": str(tmp / "enc.safetensors"), "num_classes": k, "lost": {"num_clusters": k, "k_patches": 4},
                       "stego": {"method": "kmeans"}},
        "eval": {"n": 6, "batch_size": 3, "steps": 2, "reference_n": 8, "kid_subsets": 3, "feature_name": "tiny"},
    }
    for key, value in extra.items():
        cfg[key].update(value)
    return cfg


def make_run(tmp: pathlib.Path, kind: str = "label", export: bool = True, **extra) -> pathlib.Path:
    """Write run dir with config.yaml, (optionally) pipeline/ and its annotation store and encoder;
    ``extra``: sections of :func:`tiny_config` updated key by key (the encoder follows the annotation's)."""
    from sgdm.annotation.store import write_store
    from sgdm.config.schema import ExperimentConfig
    from sgdm.data import build_dataset
    from sgdm.features_pretrain.train import build_backbone, save_backbone
    from sgdm.pipeline import SelfGuidedPipeline

    cfg = from_dict(ExperimentConfig, tiny_config(tmp, kind, **extra))
    run_dir = cfg.run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with torch.random.fork_rng(devices=[]):  # module init uses the global RNG; keep it local
        torch.manual_seed(0)
        if not cfg.annotation.weights.is_file():
            a = cfg.annotation
            save_backbone(build_backbone(a.backbone, a.backbone_kwargs), a.weights, a.backbone, a.backbone_kwargs)
        if export:
            SelfGuidedPipeline.from_config(to_dict(cfg)).save_pretrained(run_dir / "pipeline")
    if kind != "none":
        ids = build_dataset(cfg.data, train=False).ids
        n, k = len(ids), 3
        records = {"cluster": torch.arange(n) % k}
        if kind == "box":
            records["box"] = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(n, 1)
        if kind == "mask":
            masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
            masks[:, :, 4:] = 1
            records = {"mask": masks}
        write_store(cfg.annotation.store, ids, records, granularity=kind, num_classes=k)
    return run_dir


class RandomImages(torch.utils.data.Dataset):
    """``n`` fixed random 16x16 images in [-1, 1] with ids "0", "1", ...: pretraining's input in tests."""

    def __init__(self, n: int):
        self.x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "id": str(i)}


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) and key != "backbone_kwargs" else value
    return out


def record_annotation(run_dir: pathlib.Path, extractor: dict | None = None, params: dict | None = None,
                      **manifest) -> dict:
    """Write into the run's store manifest what ``sgdm-ldm annotate`` records: the ``extractor`` and the
    ``params`` the store was made with (the run's own, with these changes; ``params`` merged key by key)
    and other manifest keys. Returns the manifest."""
    import json

    from sgdm.annotation.features import file_sha256
    from sgdm.config.schema import load_recorded

    a = load_recorded(run_dir / "config.yaml").annotation
    path = a.store / "manifest.json"
    data = json.loads(path.read_text())
    data["extractor"] = {"backbone": a.backbone, "backbone_kwargs": dict(a.backbone_kwargs), "weights": str(a.weights),
                         "weights_sha256": file_sha256(a.weights), "input_size": [16, 16], **(extractor or {})}
    if params is not None:
        data["params"] = _merged(json.loads(json.dumps(to_dict(a), default=str)), params)
    data.update(manifest)
    path.write_text(json.dumps(data))
    return data

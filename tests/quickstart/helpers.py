"""The quickstart config and dotted overrides that shrink it to a test's budget."""
import pathlib

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def tiny_overrides(tmp: pathlib.Path) -> list[str]:
    assets = tmp / "assets"
    return [
        f"run.dir={tmp / 'runs'}",
        "data.shapes.num_images=48", "data.shapes.num_val_images=8", f"data.shapes.cache_dir={assets / 'shapes'}",
        f"model.autoencoder.checkpoint={assets / 'ae.ckpt'}", "prepare.autoencoder_steps=2",
        f"annotation.weights={assets / 'enc.safetensors'}", f"annotation.store={assets / 'ann-label'}",
        "prepare.pretrain.steps=2", "prepare.pretrain.batch_size=16",
        "annotation.num_classes=4", "model.guidance.num_classes=4", "annotation.lost.num_clusters=4",
        "train.max_steps=3", "train.batch_size=16", "train.checkpoint_every=3", "train.progress_bar=false",
        "prepare.report_steps=2", "prepare.report_eval_n=8", "prepare.report_samples_per_row=2",
        "prepare.report_scales=[0,2]", "prepare.companion_steps=2", "prepare.companion_mask_classes=3",
        "eval.batch_size=8", "eval.reference_n=16",
    ]

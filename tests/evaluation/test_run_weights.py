"""Evaluation takes the weights `sgdm-ldm sample` takes: a run continued past its export (train.max_steps
raised) keeps the export of its earlier end in pipeline/, and its newer checkpoint is the model to measure."""
import pathlib

import torch

from sgdm.config.core import to_dict


def _pipeline(cfg, seed: int):
    from sgdm.pipeline import SelfGuidedPipeline

    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG
        torch.manual_seed(seed)
        return SelfGuidedPipeline.from_config(to_dict(cfg))


def _write_checkpoint(pipe, path: pathlib.Path, step: int) -> None:
    """A checkpoint as training writes it, as far as pipeline_from_checkpoint reads it."""
    state = {**{f"ema.{k}": v for k, v in pipe.unet.state_dict().items()},
             **{f"first_stage.{k}": v for k, v in pipe.autoencoder.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "sgdm": {"step": step}}, path)


def test_a_run_continued_past_its_export_is_evaluated_with_its_newer_checkpoint(tmp_path, capsys):
    from sgdm.config.schema import load_recorded
    from sgdm.evaluation.evaluate import load_run
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "label", export=False)
    cfg = load_recorded(run_dir / "config.yaml")
    exported = _pipeline(cfg, 0)
    exported.save_pretrained(run_dir / "pipeline", metadata={"step": "1"})  # the earlier end
    newer = _pipeline(cfg, 1)
    ckpt = run_dir / "checkpoints" / "step-00000002.ckpt"
    _write_checkpoint(newer, ckpt, 2)
    _, pipe = load_run(run_dir, "cpu")
    assert all(torch.equal(v, newer.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert f"EMA weights of {ckpt} (step 2; the run's exported pipeline/ is older)" in capsys.readouterr().err
    _write_checkpoint(newer, run_dir / "checkpoints" / "step-00000001.ckpt", 1)
    ckpt.unlink()  # the export is of the newest checkpoint's step: it is used
    _, pipe = load_run(run_dir, "cpu")
    assert all(torch.equal(v, exported.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())

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


def test_results_record_the_step_and_file_of_the_weights_evaluated(tmp_path):
    import json

    from sgdm.cli.main import main
    from sgdm.config.schema import load_recorded
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "label", export=False)
    cfg = load_recorded(run_dir / "config.yaml")
    _pipeline(cfg, 0).save_pretrained(run_dir / "pipeline", metadata={"step": "1"})
    assert main(["eval", str(run_dir), "--metrics", "fd", "--n", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert (results["step"], results["weights_file"]) == (1, str(run_dir / "pipeline"))
    ckpt = run_dir / "checkpoints" / "step-00000002.ckpt"
    _write_checkpoint(_pipeline(cfg, 1), ckpt, 2)  # continued past its export
    assert main(["eval", str(run_dir), "--metrics", "fd", "--n", "3"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert (results["step"], results["weights_file"]) == (2, str(ckpt))
    assert "EMA weights of step 2," in (run_dir / "eval" / "results.md").read_text()

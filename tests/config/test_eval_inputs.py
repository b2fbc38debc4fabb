"""``sgdm-ldm eval`` on a run whose recorded settings no longer fit this machine."""
from __future__ import annotations

import yaml

from sgdm.cli.main import main
from tests.evaluation.helpers import tiny_config


def test_a_moved_dataset_names_the_run_config_that_records_its_root(tmp_path, capsys, monkeypatch):
    # eval takes no data.* overrides: the root is the run's, and the error said neither where it came
    # from nor where to change it
    import sgdm.evaluation.evaluate as evaluate
    from sgdm.config.schema import load_recorded
    from sgdm.data import build_dataset

    recorded = tiny_config(tmp_path)
    recorded["data"] = {"dataset": "image_folder", "root": str(tmp_path / "moved"), "size": 16}
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(recorded))
    # what evaluation does first with the data: list the reference images of the recorded data section
    monkeypatch.setattr(evaluate, "evaluate_run",
                        lambda run, ecfg: build_dataset(load_recorded(config).data, train=False))
    assert main(["eval", str(run_dir), "--n", "2", "--metrics", "fd"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and str(tmp_path / "moved") in err
    assert str(config) in err

"""What the shipped configs say in their comments holds: a commented-out setting, uncommented, works."""
from __future__ import annotations

import pathlib
import re

import pytest

from sgdm.config.schema import load_experiment
from sgdm.evaluation.fidelity import INCEPTION_FILE

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # the same FID Inception (README, --inception-weights)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_a_commented_inception_weights_path_names_the_file_that_is_shipped(config, tmp_path, monkeypatch):
    # it named pt_inception-2015-12-05.pth, a file neither torch-fidelity nor pytorch-fid writes
    text = config.read_text()
    commented = re.findall(r"^(\s*)# (inception_weights: (\S+))", text, flags=re.M)
    for indent, setting, path in commented:
        assert pathlib.Path(path).name in (INCEPTION_FILE, PYTORCH_FID_FILE), f"{config.name}: {setting}"
        monkeypatch.chdir(tmp_path)  # the path is relative to where sgdm-ldm runs; loading checks it exists
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"weights")
        uncommented = tmp_path / config.name
        uncommented.write_text(text.replace(f"{indent}# {setting}", f"{indent}{setting}"))
        assert load_experiment(uncommented).eval.inception_weights.name == pathlib.Path(path).name

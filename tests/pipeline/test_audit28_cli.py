"""Audit 28: ``sgdm-ldm sample --mask`` with a file that holds no numbers, and a bool channel mask."""
import numpy as np
import pytest

from sgdm.cli.main import main
from tests.pipeline.helpers import K, tiny_pipeline


@pytest.fixture(scope="module")
def mask_pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "p"
    tiny_pipeline("mask").save_pretrained(path)
    return path


def _sample(pipe, mask, out):
    return main(["sample", str(pipe), "-n", "1", "--steps", "1", "--mask", str(mask), "-o", str(out)])


def test_a_npy_of_strings_is_an_error_naming_the_flag(mask_pipe, tmp_path, capsys):
    """np.load gives a str array; torch.from_numpy's TypeError left the command with a traceback."""
    np.save(tmp_path / "m.npy", np.array([["a", "b"], ["c", "d"]]))
    assert _sample(mask_pipe, tmp_path / "m.npy", tmp_path / "o.png") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sgdm-ldm sample: error: --mask: {tmp_path / 'm.npy'} cannot be read as a class map"), err
    assert not (tmp_path / "o.png").exists()


def test_a_bool_channel_mask_npy_samples(mask_pipe, tmp_path):
    one_hot = np.eye(K, dtype=bool)[np.ones((16, 16), int)].transpose(2, 0, 1)  # [K, H, W], class 1 everywhere
    np.save(tmp_path / "m.npy", one_hot)
    assert _sample(mask_pipe, tmp_path / "m.npy", tmp_path / "o.png") == 0
    assert (tmp_path / "o.png").is_file()

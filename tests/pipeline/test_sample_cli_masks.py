"""``sgdm-ldm sample --mask`` with a file that holds no numbers, and a bool channel mask."""
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


def test_box_without_cluster_says_the_flags(tmp_path, capsys):
    """The pipeline's "pass both cluster= and box=" read as Python keywords on the command line."""
    tiny_pipeline("box").save_pretrained(tmp_path / "p")
    code = main(["sample", str(tmp_path / "p"), "-n", "1", "--steps", "1", "--box", "0,0,1,1",
                 "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sgdm-ldm sample: error: --cluster: box guidance"), err
    assert "takes a box together with its cluster id; pass both (or neither" in err and "=" not in err, err

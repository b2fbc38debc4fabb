"""Reading a first-stage file that is not a loadable checkpoint: a truncated download, an empty
file, a Git LFS pointer, a Lightning pickle that names a module this machine lacks. Each is a ConfigError
on model.autoencoder.checkpoint naming the file (the command line prints it on one line), and a file
that is merely corrupt is not announced as "loading the full pickle, which runs code from the file"."""
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sgdm.config.core import ConfigError
from sgdm.models.autoencoder import AutoencoderKL
from sgdm.models.checkpoints import load_autoencoder

from tests.models.helpers import tiny_autoencoder_config


@pytest.fixture
def cfg():
    return tiny_autoencoder_config()


@pytest.fixture
def state(cfg):
    return {k: v for k, v in AutoencoderKL(cfg).state_dict().items() if k != "scale_factor"}


def _load_error(path, cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as err:
            load_autoencoder(path, cfg)
    assert err.value.key == "model.autoencoder.checkpoint"
    assert str(path) in str(err.value)
    return str(err.value), [str(w.message) for w in caught]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_truncated_file_is_named_and_not_unpickled_in_full(suffix, cfg, state, tmp_path):
    path = tmp_path / f"kl-f8{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:4000])
    message, warned = _load_error(path, cfg)
    assert "cannot be read" in message
    assert not any("runs code" in w for w in warned)


def test_an_empty_file_is_named(cfg, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    message, warned = _load_error(path, cfg)
    assert "cannot be read" in message and not any("runs code" in w for w in warned)


def test_a_git_lfs_pointer_is_recognised(cfg, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 334695179\n")
    message, warned = _load_error(path, cfg)
    assert "Git LFS pointer" in message and not any("runs code" in w for w in warned)


def test_a_pickle_naming_a_missing_module_is_named(cfg, state, tmp_path, monkeypatch):
    """A Lightning checkpoint whose callbacks are objects of a package not installed here (LDM's ``ldm``,
    ``main``): weights_only refuses it, the full pickle cannot import the class; the error names the
    file and the module."""
    module = types.ModuleType("sgdm_absent_module")
    exec("class Callback:\n    pass\n", module.__dict__)
    module.Callback.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "callbacks": {"cb": module.Callback()}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    message, _ = _load_error(path, cfg)
    assert "sgdm_absent_module" in message


def test_a_lightning_pickle_of_installed_classes_still_loads(cfg, state, tmp_path):
    """The full-pickle fallback stays for files weights_only refuses but that load (with its warning)."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "callbacks": {"cb": types.SimpleNamespace(best=1.0)}}, path)
    with pytest.warns(UserWarning, match="runs code from the file"):
        model = load_autoencoder(path, cfg)
    torch.testing.assert_close(model.encoder.conv_in.weight, state["encoder.conv_in.weight"])

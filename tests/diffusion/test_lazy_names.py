"""sgdm.diffusion's lazy names cover what the samplers and pipeline docstrings point to."""
import importlib

import pytest

import sgdm.diffusion


@pytest.mark.parametrize("name", ["sampling_timesteps", "logsnr_timesteps", "SPACINGS", "DEFAULT_SPACING",
                                  "randn_like", "resolve_eps", "eps_from_output", "v_target"])
def test_documented_names_import_from_the_package(name):
    """``sampling_timesteps`` (named by SelfGuidedPipeline.__call__'s docstring) and the other public
    names of the submodules raised AttributeError from ``sgdm.diffusion``."""
    assert getattr(sgdm.diffusion, name) is getattr(importlib.import_module(
        f"sgdm.diffusion.{sgdm.diffusion._LAZY[name]}"), name)


def test_every_lazy_name_resolves_to_its_submodules_object():
    for name, module in sgdm.diffusion._LAZY.items():
        assert getattr(sgdm.diffusion, name) is getattr(importlib.import_module(f"sgdm.diffusion.{module}"), name)

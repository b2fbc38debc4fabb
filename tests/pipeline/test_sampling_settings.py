"""sampling_settings: the (num_steps, sampler, eta, spacing) a call samples with, public for records (eval's results)."""
from dataclasses import replace

import pytest

from tests.pipeline.helpers import tiny_pipeline


def test_sampling_settings_resolve_unset_arguments_as_a_call_does(monkeypatch):
    p = tiny_pipeline("label")
    monkeypatch.setattr(p, "sampler", replace(p.sampler, sampler="ddim", steps=3, eta=0.5, spacing="trailing"))
    assert p.sampling_settings() == (3, "ddim", 0.5, "trailing")
    assert p.sampling_settings(sampler="ddpm") == (3, "ddpm", 0.0, "linspace")  # its own eta and default spacing
    assert p.sampling_settings(4, spacing="leading") == (4, "ddim", 0.5, "leading")
    with pytest.raises(ValueError, match="spacing: expected one of"):
        p.sampling_settings(spacing="cosine")

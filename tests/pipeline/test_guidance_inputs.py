"""Guidance inputs the docstring promises (bool channel masks) and input errors that name the argument."""
import pytest
import torch

from sgdm.pipeline import build_condition
from tests.pipeline.helpers import K, tiny_pipeline


@pytest.fixture(scope="module")
def guidance():
    return tiny_pipeline("mask").guidance


def _ids():
    ids = torch.zeros(16, 16, dtype=torch.long)
    ids[:, 8:] = 2
    ids[0, 0] = 255  # ignored pixel: all channels off
    return ids


def test_a_bool_one_hot_channel_mask_is_its_class_map(guidance):
    """``mask``: "a float/bool channel mask [K, H, W]"; a bool one crashed in argmax (RuntimeError)."""
    ids = _ids()
    channels = torch.nn.functional.one_hot(ids.clamp(max=K - 1), K).permute(2, 0, 1).bool()
    channels[:, 0, 0] = False
    want = build_condition(guidance, 2, (8, 8), (16, 16), mask=ids)
    for mask in (channels, channels[None].expand(2, -1, -1, -1)):
        got = build_condition(guidance, 2, (8, 8), (16, 16), mask=mask)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_bool_overlapping_channel_mask_is_its_float_mask(guidance):
    channels = torch.zeros(K, 16, 16, dtype=torch.bool)
    channels[0, :, :10] = True
    channels[1, :, 6:] = True  # overlaps channel 0: not one-hot
    got = build_condition(guidance, 1, (8, 8), (16, 16), mask=channels)
    want = build_condition(guidance, 1, (8, 8), (16, 16), mask=channels.float())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got[0], torch.tensor([[1.0, 1.0, 0.0]]))


def test_the_pipeline_samples_with_a_bool_channel_mask():
    pipe = tiny_pipeline("mask")
    channels = torch.zeros(K, 16, 16, dtype=torch.bool)
    channels[1] = True
    run = lambda mask: pipe(1, mask=mask, num_steps=2, generator=torch.Generator().manual_seed(0),
                            output_type="latent", progress=False)
    torch.testing.assert_close(run(channels), run(torch.ones(16, 16, dtype=torch.long)))


@pytest.mark.parametrize("kind, kwargs, match", [
    ("label", {"cluster": "1"}, r"^cluster: expected .*integer.*got '1'"),
    ("label", {"cluster": ["0", "1"]}, r"^cluster: expected .*integer"),
    ("mask", {"mask": "mask.png"}, r"^mask: expected .*got 'mask.png'"),
    ("box", {"cluster": 0, "box": "0,0,1,1"}, r"^box: expected .*got '0,0,1,1'"),
])
def test_a_value_that_is_no_array_names_the_argument(kind, kwargs, match):
    """Strings (a cluster id from a text field, a mask's file name) were a numpy TypeError naming nothing."""
    with pytest.raises(ValueError, match=match):
        tiny_pipeline(kind)(1, num_steps=1, output_type="latent", progress=False, **kwargs)


@pytest.mark.parametrize("cluster", [[], (), torch.zeros(0, dtype=torch.long)])
def test_no_cluster_ids_at_all_says_so(cluster):
    """An empty list became a float64 array and was refused as 'expected integer ids, got dtype float64'."""
    with pytest.raises(ValueError, match=r"^cluster: got 0 items for num_images=2; pass one, or one per image"):
        tiny_pipeline("label")(2, cluster=cluster, num_steps=1, output_type="latent", progress=False)

import pytest
import torch

from sgdm.annotation.lost import lost, lost_batch


def key_map(h, w, rects, dim=16, noise=0.05, seed=0):
    """Background keys near b, object keys near o, with <o, b> < 0: the LOST setting where
    object patches correlate positively only with each other (lower degree)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(dim); b[0] = 1.0
    o = torch.zeros(dim); o[0] = -0.5; o[1] = 1.0
    keys = b + noise * torch.randn(h, w, dim, generator=g)
    for r0, c0, r1, c1, vec in rects:
        keys[r0:r1, c0:c1] = (o if vec is None else vec) + noise * torch.randn(r1 - r0, c1 - c0, dim, generator=g)
    return keys


def test_single_object_box():
    keys = key_map(8, 10, [(2, 3, 5, 7, None)])  # rows 2..4, cols 3..6
    box, seed = lost(keys, k_patches=100)
    assert 2 <= seed[0] < 5 and 3 <= seed[1] < 7
    torch.testing.assert_close(box, torch.tensor([3 / 10, 2 / 8, 7 / 10, 5 / 8]))


def test_connected_component_of_the_seed_only():
    # two objects of different kinds: the box covers the seed's connected component, never the union
    o2 = torch.zeros(16); o2[0] = -0.5; o2[2] = 1.0  # a second object type, orthogonal to the first
    keys = key_map(12, 12, [(1, 1, 3, 3, None), (7, 6, 11, 11, o2)])
    box, seed = lost(keys, k_patches=100)
    small = torch.tensor([1 / 12, 1 / 12, 3 / 12, 3 / 12])
    torch.testing.assert_close(box, small)  # the 4-patch object has the lowest degree: it holds the seed
    assert seed[0] in (1, 2) and seed[1] in (1, 2)


def test_batch_and_bad_shapes():
    keys = torch.stack([key_map(6, 6, [(0, 0, 2, 3, None)]), key_map(6, 6, [(3, 3, 6, 6, None)], seed=1)])
    boxes = lost_batch(keys, k_patches=10)
    torch.testing.assert_close(boxes, torch.tensor([[0, 0, 3 / 6, 2 / 6], [3 / 6, 3 / 6, 1, 1]]))
    assert lost_batch(torch.zeros(0, 4, 4, 8)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[h, w, D\]"):
        lost(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\[B, h, w, D\]"):
        lost_batch(torch.zeros(4, 4, 8))


def test_centring_removes_a_shared_component():
    # A large component shared by every patch makes all similarities positive: every
    # patch has the full degree, the uncentred seed is the first patch, and the box
    # swells to the whole map. Centring recovers the object.
    keys = key_map(8, 10, [(2, 3, 5, 7, None)])
    shared = torch.zeros(16); shared[5] = 20.0
    keys = keys + shared
    raw, raw_seed = lost(keys, k_patches=100)
    assert raw_seed == (0, 0)
    torch.testing.assert_close(raw, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    box, seed = lost(keys, k_patches=100, center=True)
    torch.testing.assert_close(box, torch.tensor([3 / 10, 2 / 8, 7 / 10, 5 / 8]))
    assert 2 <= seed[0] < 5 and 3 <= seed[1] < 7
    torch.testing.assert_close(lost_batch(keys[None], 100, center=True), box[None])

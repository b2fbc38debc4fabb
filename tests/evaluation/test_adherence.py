"""The mask-adherence protocol: id-for-id mIoU with the store's own f, Hungarian matching otherwise."""
import json

import pytest
import torch

from sgdm.evaluation.adherence import mask_scores


def _guides(generator, n=4, size=8, classes=3):
    masks = torch.randint(0, classes, (n, size, size), generator=generator, dtype=torch.uint8)
    masks[:, 0, 0] = 255  # ignored pixels stay ignored under both protocols
    return masks


def test_permuted_ids_score_one_under_hungarian_and_zero_id_for_id(generator):
    # a segmentation that draws the guiding layout exactly but names its segments otherwise
    masks = _guides(generator)
    perm = torch.tensor([1, 2, 0])  # no id keeps its name
    pred = perm[masks.long().clamp(max=2)]
    hungarian = mask_scores(pred, masks, 3, "hungarian")
    identity = mask_scores(pred, masks, 3, "identity")
    assert hungarian["mask_miou"] == pytest.approx(1.0) and hungarian["mask_pixel_accuracy"] == pytest.approx(1.0)
    assert identity["mask_miou"] == 0.0 and identity["mask_pixel_accuracy"] == 0.0
    assert (hungarian["mask_matching"], identity["mask_matching"]) == ("hungarian", "identity")
    # the Hungarian score goes beside every score, so old numbers stay comparable
    assert identity["mask_miou_hungarian"] == pytest.approx(1.0) == identity["mask_pixel_accuracy_hungarian"]
    assert hungarian["mask_miou_hungarian"] == hungarian["mask_miou"]
    # the same ids: both protocols agree on a perfect score
    same = mask_scores(masks.long().clamp(max=2), masks, 3, "identity")
    assert same["mask_miou"] == pytest.approx(1.0) == same["mask_miou_hungarian"]


def test_identity_miou_by_hand():
    # one 2x3 image, K = 4; the 255 pixel is ignored; class 3 is predicted but absent from
    # the guidance, so it counts as 0 (as in STEGO's and mmsegmentation's mIoU)
    masks = torch.tensor([[[0, 0, 1], [1, 2, 255]]], dtype=torch.uint8)
    pred = torch.tensor([[[0, 1, 1], [1, 3, 0]]])
    out = mask_scores(pred, masks, 4, "identity")
    # (pred, guide) pairs: (0,0) (1,0) (1,1) (1,1) (3,2)
    # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 2 / (2 + 3 - 2) = 2/3, IoU_2 = 0 / (1 + 0 - 0) = 0,
    # IoU_3 = 0 / (0 + 1 - 0) = 0
    assert out["mask_miou"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4)
    assert out["mask_pixel_accuracy"] == pytest.approx(3 / 5)
    # Hungarian pairs 0-0, 1-1, 3-2: IoU_2 becomes 1 / (1 + 1 - 1) = 1; class 3 is matched to the
    # empty predicted class 2, so its union is empty and it is left out
    assert out["mask_miou_hungarian"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert out["mask_pixel_accuracy_hungarian"] == pytest.approx(4 / 5)


def test_bad_input_is_named():
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="matching: expected identity or hungarian, got 'auto'"):
        mask_scores(masks.long(), masks, 3, "auto")
    with pytest.raises(ValueError, match=r"pred: class maps of shape \(2, 4, 3\) for guiding masks of shape \(2, 4, 4\)"):
        mask_scores(torch.zeros(2, 4, 3, dtype=torch.long), masks, 3, "identity")
    masks[0, 0, 0] = 5  # guidance from another segmenter: its ids cannot be this one's
    with pytest.raises(ValueError, match="masks: class id 5 is outside the segmenter's 3 classes"):
        mask_scores(torch.zeros(2, 4, 4, dtype=torch.long), masks, 3, "identity")
    assert mask_scores(torch.zeros(2, 4, 4, dtype=torch.long), masks, 3, "hungarian")["mask_matching"] == "hungarian"


def _keep_a_segmenter(run_dir):
    """Give the tiny run's mask store an f (random k-means centroids on the tiny ViT's 32-d tokens),
    as `sgdm-ldm annotate` keeps the one that made the masks."""
    from sgdm.annotation.stego import Segmenter
    from sgdm.annotation.store import AnnotationStore, write_store
    from sgdm.config.schema import load_experiment

    store = AnnotationStore.open(load_experiment(run_dir / "config.yaml").annotation.store)
    ids = list(store.ids)
    masks = torch.stack([store.get(i)["mask"] for i in ids])
    Segmenter(torch.randn(3, 32, generator=torch.Generator().manual_seed(0))).save(store.path / "segmenter.safetensors")
    write_store(store.path, ids, {"mask": masks}, granularity="mask", num_classes=3,
                extra={"segmenter": "segmenter.safetensors"})


@pytest.mark.parametrize("stored_f", [True, False])
def test_results_json_records_the_matching(tmp_path, stored_f):
    from sgdm.cli.main import main
    from tests.evaluation.helpers import make_run

    run_dir = make_run(tmp_path, "mask")
    if stored_f:
        _keep_a_segmenter(run_dir)
    assert main(["eval", str(run_dir), "--metrics", "adherence", "--sweep-scale", "1,2"]) == 0
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    matching = "identity" if stored_f else "hungarian"
    for row in results["results"]:
        keys = list(row)
        assert keys[keys.index("mask_miou") + 2] == "mask_matching"  # next to the score it names
        assert row["mask_matching"] == matching and 0 <= row["mask_miou"] <= 1
        assert 0 <= row["mask_miou_hungarian"] <= 1 and 0 <= row["mask_pixel_accuracy_hungarian"] <= 1
        if not stored_f:
            assert row["mask_miou_hungarian"] == row["mask_miou"]
    assert f"| {matching} |" in (run_dir / "eval" / "results.md").read_text()
    assert (run_dir / "eval" / "sweep.png").stat().st_size > 0  # the matching's name is no panel of the plot


def test_the_stores_f_with_crf_segments_the_samples_with_their_images():
    # f refines with a dense CRF: adherence hands it the generated images, and the guiding mask it
    # drew (CRF-cleaned) scores 1 id for id where the plain nearest-centroid map would not
    from types import SimpleNamespace

    from sgdm.annotation.config import CRFConfig, KMeansConfig, StegoConfig
    from sgdm.annotation.stego import Segmenter
    from sgdm.evaluation.adherence import mask_adherence
    from tests.annotation.test_stego_crf import CENTROIDS, noisy_halves

    patches, images, truth, noisy = noisy_halves()
    segmenter = Segmenter(CENTROIDS, crf=CRFConfig(enabled=True))
    masks = truth[None].to(torch.uint8)
    out = mask_adherence(SimpleNamespace(device="cpu"), images, masks, 2, StegoConfig(), KMeansConfig(),
                         torch.Generator(), segmenter=segmenter, tokens=(patches, torch.zeros(1, 2)))
    assert out["mask_matching"] == "identity" and out["mask_pixel_accuracy"] == 1.0
    plain = mask_adherence(SimpleNamespace(device="cpu"), images, masks, 2, StegoConfig(), KMeansConfig(),
                           torch.Generator(), segmenter=Segmenter(CENTROIDS), tokens=(patches, torch.zeros(1, 2)))
    assert plain["mask_pixel_accuracy"] == pytest.approx(float((noisy == truth).double().mean()))

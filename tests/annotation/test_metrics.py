import math

import numpy as np
import pytest
import torch

from sgdm.annotation.metrics import ari, box_iou, cluster_scores, confusion, corloc, hungarian_miou, nmi, purity

# clusters [0,0,0,1,1,1] vs classes [0,0,1,1,2,2]: contingency [[2,1,0],[0,1,2]]
PRED = [0, 0, 0, 1, 1, 1]
TRUE = [0, 0, 1, 1, 2, 2]


def test_purity_by_hand():
    assert purity(PRED, TRUE) == pytest.approx(4 / 6)


def test_nmi_by_hand():
    h_pred = math.log(2)
    h_true = math.log(3)
    # I = sum p_ij log(p_ij / (p_i p_j)): cells 2/6 (twice) and 1/6 (twice), p_i = 1/2, p_j = 1/3
    mi = 2 * (2 / 6) * math.log((2 / 6) / (1 / 6)) + 2 * (1 / 6) * math.log((1 / 6) / (1 / 6))
    assert nmi(PRED, TRUE) == pytest.approx(mi / ((h_pred + h_true) / 2))


def test_ari_by_hand():
    index = 1 + 1  # C(2,2) twice
    rows, cols = 2 * 3, 3 * 1  # C(3,2) twice; C(2,2) three times
    expected = rows * cols / 15  # C(6,2) = 15
    assert ari(PRED, TRUE) == pytest.approx((index - expected) / ((rows + cols) / 2 - expected))


def test_perfect_and_permuted():
    labels = [3, 3, 1, 1, 0]
    perm = [7, 7, 5, 5, 9]
    assert nmi(perm, labels) == pytest.approx(1.0)
    assert ari(perm, labels) == pytest.approx(1.0)
    assert purity(perm, labels) == 1.0


def test_cluster_scores_drop_unlabelled_and_match_sklearn():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
    true[:10] = -1
    scores = cluster_scores(pred, true)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(true[10:], pred[10:]))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(true[10:], pred[10:]))


def test_box_iou_and_corloc():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 1.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0.5]], dtype=torch.float64))
    preds = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    gts = [b, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)]
    assert corloc(preds, gts) == pytest.approx(1 / 3)  # hit (IoU 0.5), miss (1/16), no gt box


def test_hungarian_miou_by_hand():
    # predicted classes are a permutation of true ones, plus an extra predicted class
    true = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[1, 1, 0, 0], [2, 3, 0, 0]])
    table = confusion(pred, true, num_pred=4, num_true=3)
    assert table.sum() == 6  # ignore pixels skipped
    scores = hungarian_miou(table)
    # matching 1->0, 0->1, 2->2 (or 3->2): IoUs 1, 1, 1/2
    assert scores["miou"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)


def test_hungarian_miou_counts_classes_predicted_but_absent_from_the_truth():
    # true class 2 has no pixels; after matching 0->0, 1->1, predicted class 2 (one pixel of true
    # class 1) is matched to it: its union is that pixel, so it scores 0 and counts (as in STEGO)
    table = np.array([[2, 0, 0], [0, 2, 0], [0, 1, 0]])
    scores = hungarian_miou(table)
    assert scores["miou"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 5)
    # an empty predicted class matched to an absent true class is left out
    assert hungarian_miou(np.array([[2, 0, 0], [0, 2, 0], [0, 0, 0]]))["miou"] == 1.0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: nmi([], []), "empty"),
        (lambda: purity([0, 1], [0]), "same length"),
        (lambda: corloc(torch.zeros(2, 4), [torch.zeros(1, 4)]), "2 predicted boxes for 1 images"),
        (lambda: confusion(torch.zeros(2, 2), torch.zeros(3, 3), 2, 2), "shape"),
        (lambda: confusion(torch.full((2,), 5), torch.zeros(2), 2, 2), "outside"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()

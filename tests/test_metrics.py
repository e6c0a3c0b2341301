"""Scores (Dice, IoU, AJI, PQ, F1) on hand-computed cases and against MONAI; watershed post-processing."""

import numpy as np
import pytest
import torch
from monai.metrics import PanopticQualityMetric, compute_panoptic_quality
from scipy import ndimage
from skimage.draw import disk, ellipse

from sppnet_monai.metrics import (
    aggregated_jaccard_index,
    dice_score,
    iou_score,
    object_f1,
    panoptic_quality,
    resize_nearest,
    score_image,
    summarise,
)
from sppnet_monai.postprocess import instances_from_semantic


def _disks(shape, discs):
    """(H, W) int32 label map with disk ``i + 1`` at ``discs[i] = (row, col, radius)``; later ones on top."""
    labels = np.zeros(shape, dtype=np.int32)
    for i, (row, col, radius) in enumerate(discs, start=1):
        rr, cc = disk((row, col), radius, shape=shape)
        labels[rr, cc] = i
    return labels


def _random_instances(rng, size=96, count=12):
    """Random overlapping disks, and a prediction of them: shifted, one dropped, two merged, one added."""
    truth = _disks((size, size), [(*rng.integers(0, size, 2), rng.integers(4, 10)) for _ in range(count)])
    pred = np.roll(truth, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) * 5  # ids need not be consecutive
    ids = np.unique(pred[pred > 0])
    pred[pred == ids[0]] = 0
    pred[pred == ids[1]] = ids[2]
    rr, cc = disk(tuple(rng.integers(0, size, 2)), 5, shape=pred.shape)
    pred[rr, cc] = 999
    return pred, truth


# -- pixel level ---------------------------------------------------------------------------


def test_dice_and_iou_by_hand():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), np.uint8)
    pred[0, :3] = True  # 3 px
    truth[0, 1:] = 255  # 3 px, 2 shared
    assert dice_score(pred, truth) == pytest.approx(2 * 2 / 6)
    assert iou_score(pred, truth) == pytest.approx(2 / 4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_score(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="shape"):
        aggregated_jaccard_index(np.zeros((4, 4), int), np.zeros((5, 4), int))


# -- AJI -------------------------------------------------------------------------------------


def test_aji_one_prediction_over_two_nuclei_and_a_false_positive():
    # G1 = rows 0-1 x cols 0-3 (8 px), G2 = rows 0-1 x cols 4-7 (8 px), touching.
    # S1 = rows 0-1 x cols 2-5 (8 px): half of each. S2 = row 3 x cols 8-9 (2 px): a false positive.
    # G1: best S1, |G1 n S1| = 4, |G1 u S1| = 12.  G2: best S1 again, 4 and 12.
    # S2 unused: U += 2.  AJI = (4 + 4) / (12 + 12 + 2) = 8 / 26.
    truth = np.zeros((4, 10), np.int32)
    truth[0:2, 0:4], truth[0:2, 4:8] = 1, 2
    pred = np.zeros((4, 10), np.int32)
    pred[0:2, 2:6], pred[3, 8:10] = 1, 2
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(8 / 26)

    # A third nucleus G3 (row 3 x cols 0-2, 3 px) that nothing overlaps only adds to U: 8 / 29.
    truth[3, 0:3] = 3
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(8 / 29)


def test_aji_matches_by_iou_not_by_intersection():
    # G = row 0 x cols 0-9 (10 px).
    # S1 = row 0 x cols 0-5 plus row 1 x cols 0-9 (16 px): |G n S1| = 6, |G u S1| = 20, IoU 0.3.
    # S2 = row 0 x cols 6-9 (4 px):                         |G n S2| = 4, |G u S2| = 10, IoU 0.4.
    # Best is S2: C = 4, U = 10 + |S1| (unused) = 26.  (By intersection it would be 6 / 24.)
    truth = np.zeros((2, 10), np.int32)
    truth[0] = 7
    pred = np.zeros((2, 10), np.int32)
    pred[0, 0:6], pred[1], pred[0, 6:10] = 1, 1, 2
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(4 / 26)


def _aji_by_the_book(pred, truth):
    """Kumar et al. 2017, Algorithm 1, literally: one mask per nucleus, loops over pairs."""
    pred_ids, true_ids = [i for i in np.unique(pred) if i], [i for i in np.unique(truth) if i]
    used, intersection, union = set(), 0, 0
    for g in true_ids:
        g_mask = truth == g
        ious = [((g_mask & (pred == s)).sum() / (g_mask | (pred == s)).sum(), s) for s in pred_ids]
        best_iou, best = max(ious, key=lambda pair: (pair[0], -pair[1]), default=(0.0, None))
        if best_iou == 0:
            union += g_mask.sum()
            continue
        intersection += (g_mask & (pred == best)).sum()
        union += (g_mask | (pred == best)).sum()
        used.add(best)
    union += sum((pred == s).sum() for s in pred_ids if s not in used)
    return intersection / union


@pytest.mark.parametrize("seed", range(4))
def test_aji_agrees_with_the_algorithm_as_published(seed):
    pred, truth = _random_instances(np.random.default_rng(seed))
    assert aggregated_jaccard_index(pred, truth) == pytest.approx(_aji_by_the_book(pred, truth), abs=1e-12)


# -- PQ --------------------------------------------------------------------------------------


def _pq_case():
    """One nucleus per row pair; see test_panoptic_quality_by_hand for the numbers."""
    truth = np.zeros((10, 10), np.int32)
    pred = np.zeros((10, 10), np.int32)
    truth[0, 0:10], pred[0, 0:8] = 1, 1  # A: IoU 8/10 = 0.8, a match
    truth[2, 0:6], pred[2, 0:3] = 2, 2  # B: IoU 3/6 = 0.5, not above 0.5: one FN and one FP
    truth[4, 0:4] = 3  # C: nothing predicted, FN
    pred[6, 0:2] = 4  # D: nothing true, FP
    truth[8, 0:5], pred[8, 0:5], pred[9, 0] = 5, 5, 5  # E: IoU 5/6, a match
    return pred, truth


def test_panoptic_quality_by_hand():
    # TP = 2 (A, E), FP = 2 (B', D), FN = 2 (B, C).
    # DQ = 2 / (2 + 1 + 1) = 0.5; SQ = (0.8 + 5/6) / 2; PQ = DQ * SQ.
    pred, truth = _pq_case()
    scores = panoptic_quality(pred, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 2, 2)
    assert scores["dq"] == pytest.approx(0.5)
    assert scores["sq"] == pytest.approx((0.8 + 5 / 6) / 2)
    assert scores["pq"] == pytest.approx(0.5 * (0.8 + 5 / 6) / 2)
    assert object_f1(pred, truth) == scores["dq"]


def test_panoptic_quality_threshold_must_keep_matches_unique():
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(np.zeros((2, 2), int), np.zeros((2, 2), int), iou_threshold=0.3)


def _monai_input(instances):
    """(1, 2, H, W) int tensor: instance ids and class (1 = nucleus), MONAI's panoptic format."""
    instances = torch.as_tensor(instances, dtype=torch.int64)
    return torch.stack([instances, (instances > 0).long()])[None]


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_quality_agrees_with_monai(seed):
    pred, truth = _random_instances(np.random.default_rng(seed))
    ours = panoptic_quality(pred, truth)
    tp, fp, fn, _ = compute_panoptic_quality(
        torch.as_tensor(pred), torch.as_tensor(truth), output_confusion_matrix=True
    ).tolist()
    assert (ours["tp"], ours["fp"], ours["fn"]) == (tp, fp, fn)
    assert 0 < ours["tp"] and 0 < ours["pq"] < 1
    metric = PanopticQualityMetric(num_classes=1, metric_name=("pq", "sq", "rq"))
    metric(_monai_input(pred), _monai_input(truth))
    pq, sq, rq = (float(value) for value in metric.aggregate())
    # MONAI adds 1e-6 to each denominator and sums IoUs in float32: agreement to about 1e-7.
    assert ours["pq"] == pytest.approx(pq, abs=1e-6)
    assert ours["sq"] == pytest.approx(sq, abs=1e-6)
    assert ours["dq"] == pytest.approx(rq, abs=1e-6)


def test_hand_case_agrees_with_monai():
    pred, truth = _pq_case()
    monai_pq = float(compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(truth)))
    assert panoptic_quality(pred, truth)["pq"] == pytest.approx(monai_pq, abs=1e-6)


# -- edge cases ------------------------------------------------------------------------------


def test_perfect_prediction_scores_one_whatever_its_ids():
    _, truth = _random_instances(np.random.default_rng(0))
    pred = np.where(truth > 0, truth * 3 + 100, 0)  # the same nuclei under other ids
    assert aggregated_jaccard_index(pred, truth) == 1.0
    scores = panoptic_quality(pred, truth)
    assert (scores["pq"], scores["dq"], scores["sq"], scores["fp"], scores["fn"]) == (1.0, 1.0, 1.0, 0, 0)
    assert dice_score(pred, truth) == iou_score(pred, truth) == 1.0


def test_empty_against_empty_is_perfect():
    empty = np.zeros((8, 8), np.int32)
    assert dice_score(empty, empty) == iou_score(empty, empty) == 1.0
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert panoptic_quality(empty, empty) == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    assert object_f1(empty, empty) == 1.0


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_empty_against_nuclei_scores_zero(empty_side):
    nuclei = _disks((32, 32), [(8, 8, 4), (20, 20, 5)])
    empty = np.zeros_like(nuclei)
    pred, truth = (empty, nuclei) if empty_side == "pred" else (nuclei, empty)
    assert dice_score(pred, truth) == iou_score(pred, truth) == 0.0
    assert aggregated_jaccard_index(pred, truth) == 0.0
    scores = panoptic_quality(pred, truth)
    assert scores["pq"] == scores["dq"] == scores["sq"] == 0.0
    assert (scores["fp"], scores["fn"]) == ((0, 2) if empty_side == "pred" else (2, 0))


# -- resizing, per-image scores, summary -----------------------------------------------------


def test_resize_nearest_keeps_labels_and_matches_torch_nearest_exact():
    labels = np.random.default_rng(0).integers(0, 7, (100, 70)).astype(np.uint16)
    for size in (256, (30, 45)):
        resized = resize_nearest(labels, size)
        shape = (size, size) if isinstance(size, int) else size
        expected = torch.nn.functional.interpolate(
            torch.as_tensor(labels, dtype=torch.float32)[None, None], size=shape, mode="nearest-exact"
        )[0, 0].numpy()
        assert resized.shape == shape and resized.dtype == labels.dtype
        np.testing.assert_array_equal(resized, expected)


def test_score_image_and_summarise():
    truth = _disks((64, 64), [(16, 16, 8), (16, 31, 8), (45, 45, 9)])  # 1 and 2 touch
    perfect = score_image(truth > 0, truth)
    assert set(perfect) == {"dice", "iou", "dice_256", "iou_256", "aji", "pq", "f1"}
    assert perfect["dice"] == perfect["iou"] == perfect["dice_256"] == perfect["iou_256"] == 1.0
    assert perfect["aji"] > 0.9 and perfect["pq"] > 0.85 and perfect["f1"] == 1.0  # watershed split 1 and 2
    missed = score_image(np.zeros((64, 64), bool), truth, {"min_size": 5})
    assert all(value == 0.0 for value in missed.values())

    summary = summarise([perfect, missed])
    assert list(summary) == list(perfect)
    assert summary["dice"] == {"mean": 0.5, "std": 0.5, "per_image": [1.0, 0.0]}
    with pytest.raises(ValueError):
        summarise([perfect, {"dice": 1.0}])
    with pytest.raises(ValueError):
        summarise([])


# -- watershed post-processing ---------------------------------------------------------------


def test_watershed_splits_touching_disks_and_keeps_an_isolated_one():
    truth = _disks((64, 64), [(20, 16, 9), (20, 33, 9), (48, 48, 7)])  # 1 and 2 touch
    assert ndimage.label(truth > 0)[1] == 2  # one blob for the touching pair
    instances = instances_from_semantic(truth > 0)
    assert instances.dtype == np.int32 and instances.shape == truth.shape
    assert instances.max() == 3
    np.testing.assert_array_equal(np.unique(instances), [0, 1, 2, 3])  # consecutive
    assert np.array_equal(instances > 0, truth > 0)
    assert aggregated_jaccard_index(instances, truth) > 0.95


def test_watershed_keeps_elongated_and_border_nuclei_whole():
    mask = np.zeros((64, 64), bool)
    rr, cc = ellipse(30, 30, 7, 20, rotation=0.4, shape=mask.shape)  # 20 x 7 px semi-axes
    mask[rr, cc] = True
    rr, cc = disk((0, 58), 6, shape=mask.shape)  # cut by the image border
    mask[rr, cc] = True
    instances = instances_from_semantic(mask)
    assert instances.max() == 2
    assert np.array_equal(instances > 0, mask)


def test_watershed_drops_small_objects_and_handles_empty():
    mask = np.zeros((32, 32), bool)
    mask[2:4, 2:4] = True  # 4 px
    mask[10:20, 10:20] = True
    instances = instances_from_semantic(mask, min_size=10)
    np.testing.assert_array_equal(np.unique(instances), [0, 1])
    assert not instances[2:4, 2:4].any()
    empty = instances_from_semantic(np.zeros((16, 16), np.uint8))
    assert empty.dtype == np.int32 and not empty.any()

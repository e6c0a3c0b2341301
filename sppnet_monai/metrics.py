"""Scores of a nuclei segmentation against ground truth, per image, in numpy.

Pixel level: Dice and IoU of the binary masks (at full resolution and at the paper's 256x256).
Object level, on instance label maps (``(H, W)`` int, 0 = background, one id per nucleus):
AJI, panoptic quality and object F1. Every score is a float in [0, 1]; a pair of empty inputs
(nothing to find, nothing found) scores 1.0 (``EMPTY_TRUTH_RULE``). Dice and IoU are MONAI's
``compute_dice`` / ``compute_iou``, the implementation the bundle's validation metrics use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from sppnet_monai.data.instances import relabel_consecutive
from sppnet_monai.postprocess import instances_from_semantic

__all__ = [
    "aggregated_jaccard_index",
    "dice_score",
    "iou_score",
    "object_f1",
    "panoptic_quality",
    "resize_nearest",
    "score_image",
    "summarise",
]

# The paper (SPPNet, Xu et al. 2023) reports Dice and IoU after resizing to 256x256.
PAPER_SIZE = 256
# The project's one rule for images without nuclei, wherever Dice or IoU is computed (this module,
# the bundle's MeanDice / MeanIoUHandler with ``ignore_empty: false``): MONAI's ``ignore_empty=False``.
EMPTY_TRUTH_RULE = "empty ground truth scores 1.0 if the prediction is empty too, else 0.0"


def _same_shape(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")


def _binary_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool (non-zero = foreground), after checking their shapes match."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    _same_shape(pred, truth)
    return pred != 0, truth != 0


def _monai_binary_score(score_fn, pred: np.ndarray, truth: np.ndarray) -> float:
    """One image's score by MONAI's ``compute_dice``/``compute_iou`` on ``(1, 1, H, W)`` masks (``EMPTY_TRUTH_RULE``)."""
    pred, truth = _binary_pair(pred, truth)
    as_batch = lambda mask: torch.from_numpy(np.ascontiguousarray(mask))[None, None]  # noqa: E731
    return float(score_fn(as_batch(pred), as_batch(truth), include_background=True, ignore_empty=False)[0, 0])


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks: ``2 |P ∩ T| / (|P| + |T|)``, by MONAI's ``compute_dice``.

    Dice, "Measures of the amount of ecologic association between species", Ecology 1945.
    ``pred`` and ``truth``: ``(H, W)`` masks (or any shape, the same for both) of any dtype,
    non-zero = foreground. Empty ground truth: see ``EMPTY_TRUTH_RULE``.
    """
    return _monai_binary_score(compute_dice, pred, truth)


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two binary masks: ``|P ∩ T| / |P ∪ T|``, by MONAI's ``compute_iou``.

    Jaccard, "The distribution of the flora in the alpine zone", New Phytologist 1912.
    Same inputs and empty-truth rule as :func:`dice_score`.
    """
    return _monai_binary_score(compute_iou, pred, truth)


def _consecutive_ids(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """``(H, W)`` integer label map -> (the same map with ids ``1..N`` in their order, ``N``)."""
    relabelled = relabel_consecutive(instances, np.int64)
    return relabelled, int(relabelled.max(initial=0))


@dataclass(frozen=True)
class _Overlaps:
    """Areas of the nuclei of two label maps and the pixel count of every overlapping pair.

    Nuclei are indexed by consecutive ids (index 0 of the area arrays is the background).
    The pairs are the non-zero cells of the joint histogram of the two maps, so there are at
    most as many as overlapping pixels, however many nuclei either map has.
    """

    true_area: np.ndarray  # (N_true + 1,) int64
    pred_area: np.ndarray  # (N_pred + 1,) int64
    true_id: np.ndarray  # (K,) int64, in 1..N_true
    pred_id: np.ndarray  # (K,) int64, in 1..N_pred
    intersection: np.ndarray  # (K,) int64, > 0

    @property
    def iou(self) -> np.ndarray:
        """``(K,)`` float64 IoU of each overlapping pair."""
        union = self.true_area[self.true_id] + self.pred_area[self.pred_id] - self.intersection
        return self.intersection / union


def _overlaps(pred_instances: np.ndarray, true_instances: np.ndarray) -> _Overlaps:
    """Joint histogram of two ``(H, W)`` label maps, kept sparse (see :class:`_Overlaps`)."""
    _same_shape(np.asarray(pred_instances), np.asarray(true_instances))
    truth, n_true = _consecutive_ids(true_instances)
    pred, n_pred = _consecutive_ids(pred_instances)
    true_area = np.bincount(truth.ravel(), minlength=n_true + 1)
    pred_area = np.bincount(pred.ravel(), minlength=n_pred + 1)
    both = (truth > 0) & (pred > 0)
    # One code per (true, pred) pair; counting the codes is the joint histogram.
    codes, intersection = np.unique(truth[both] * (n_pred + 1) + pred[both], return_counts=True)
    true_id, pred_id = np.divmod(codes, n_pred + 1)
    return _Overlaps(true_area, pred_area, true_id, pred_id, intersection)


def aggregated_jaccard_index(pred_instances: np.ndarray, true_instances: np.ndarray) -> float:
    """Aggregated Jaccard Index (AJI) of Kumar et al., IEEE TMI 36(7) 2017, Algorithm 1.

    For each true nucleus ``G_i`` take the predicted nucleus ``S_j`` of largest IoU with it
    (among those that overlap it; ties go to the lowest id) and add ``|G_i ∩ S_j|`` to ``C``
    and ``|G_i ∪ S_j|`` to ``U``; a ``G_i`` that no prediction overlaps adds ``|G_i|`` to ``U``.
    A prediction may be chosen by several true nuclei (then its pixels count once per choice,
    as in the original AJI; AJI+ forbids this). Every predicted nucleus never chosen adds its
    area to ``U``. ``AJI = C / U``.

    Args:
        pred_instances, true_instances: ``(H, W)`` integer label maps, 0 = background; ids need
            not be consecutive.

    Returns:
        AJI in [0, 1]; 1.0 when both maps are empty, 0.0 when exactly one is.
    """
    overlaps = _overlaps(pred_instances, true_instances)
    all_true, all_pred = int(overlaps.true_area[1:].sum()), int(overlaps.pred_area[1:].sum())
    if all_true + all_pred == 0:
        return 1.0
    # Sort the pairs by true id, then IoU descending, then pred id: the first pair of each true
    # id is its best match.
    order = np.lexsort((overlaps.pred_id, -overlaps.iou, overlaps.true_id))
    _, first = np.unique(overlaps.true_id[order], return_index=True)
    best = order[first]
    true_id, pred_id, intersection = overlaps.true_id[best], overlaps.pred_id[best], overlaps.intersection[best]
    matched_union = overlaps.true_area[true_id] + overlaps.pred_area[pred_id] - intersection
    unmatched_true = all_true - int(overlaps.true_area[true_id].sum())
    unused_pred = all_pred - int(overlaps.pred_area[np.unique(pred_id)].sum())
    union = int(matched_union.sum()) + unmatched_true + unused_pred
    return int(intersection.sum()) / union


def panoptic_quality(
    pred_instances: np.ndarray, true_instances: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Panoptic quality of Kirillov et al., CVPR 2019, for one class (nuclei).

    A predicted and a true nucleus match when their IoU exceeds ``iou_threshold``; from 0.5 up
    a nucleus can match at most one other, so no assignment is needed. Matches are true
    positives (TP), unmatched predictions false positives (FP), unmatched true nuclei false
    negatives (FN), and

    - ``dq`` (detection quality) = ``TP / (TP + FP/2 + FN/2)``, the object F1;
    - ``sq`` (segmentation quality) = mean IoU of the matched pairs (0.0 without matches);
    - ``pq`` = ``dq * sq`` = ``sum of matched IoUs / (TP + FP/2 + FN/2)``.

    Unlike MONAI's ``compute_panoptic_quality``, no ``1e-6`` is added to denominators (so a
    perfect prediction scores exactly 1.0), and two empty maps score 1.0 rather than 0.0.

    Args:
        pred_instances, true_instances: ``(H, W)`` integer label maps, 0 = background.
        iou_threshold: in [0.5, 1]; matches need an IoU strictly above it.

    Returns:
        ``{"pq", "dq", "sq"}`` floats in [0, 1] and ``{"tp", "fp", "fn"}`` counts (ints).
    """
    if not 0.5 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0.5, 1] for matches to be unique, got {iou_threshold}")
    overlaps = _overlaps(pred_instances, true_instances)
    n_true, n_pred = len(overlaps.true_area) - 1, len(overlaps.pred_area) - 1
    if n_true + n_pred == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    matched_iou = overlaps.iou[overlaps.iou > iou_threshold]
    tp = len(matched_iou)
    fp, fn = n_pred - tp, n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched_iou.sum()) / tp if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def object_f1(pred_instances: np.ndarray, true_instances: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Object-level F1: ``2 TP / (2 TP + FP + FN)`` with matches at IoU > ``iou_threshold``.

    This is exactly the detection quality ``dq`` of :func:`panoptic_quality` (at the usual 0.5,
    the F1 of nucleus detection used in e.g. HoVer-Net's evaluation). 1.0 when both are empty.
    """
    return panoptic_quality(pred_instances, true_instances, iou_threshold)["dq"]


def resize_nearest(mask: np.ndarray, size: int | tuple[int, int] = PAPER_SIZE) -> np.ndarray:
    """Resize a ``(H, W)`` mask or label map to ``(size, size)`` (or ``size=(h, w)``), same dtype.

    Nearest neighbour, so labels are never blended into values that are no label; each output
    pixel takes the input pixel under its centre (as torch's ``"nearest-exact"``, PIL's
    ``NEAREST``; OpenCV's ``INTER_NEAREST`` samples at the corner instead and may shift by up to
    one output pixel).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask, got shape {mask.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = np.minimum(((np.arange(out_h) + 0.5) * mask.shape[0] / out_h).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * mask.shape[1] / out_w).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def score_image(
    pred_mask: np.ndarray,
    true_instances: np.ndarray,
    postprocess_kwargs: Mapping[str, Any] | None = None,
    pred_instances: np.ndarray | None = None,
) -> dict[str, float]:
    """All scores of one image.

    Args:
        pred_mask: ``(H, W)`` predicted nuclei mask, non-zero = nucleus.
        true_instances: ``(H, W)`` integer ground-truth label map, 0 = background.
        postprocess_kwargs: arguments of :func:`~sppnet_monai.postprocess.instances_from_semantic`,
            which splits ``pred_mask`` into nuclei for the object-level scores.
        pred_instances: ``(H, W)`` predicted nuclei, used instead of splitting ``pred_mask``.

    Returns:
        ``dice``, ``iou`` (full resolution), ``dice_256``, ``iou_256`` (after nearest-neighbour
        resizing of both masks, the paper's protocol), ``aji``, ``pq`` and ``f1`` (object F1 at
        IoU 0.5).
    """
    pred_mask, true_instances = np.asarray(pred_mask), np.asarray(true_instances)
    pred_fg, true_fg = _binary_pair(pred_mask, true_instances)
    pred_small, true_small = resize_nearest(pred_fg), resize_nearest(true_fg)
    if pred_instances is None:
        pred_instances = instances_from_semantic(pred_fg, **(postprocess_kwargs or {}))
    else:
        _same_shape(np.asarray(pred_instances), true_instances)
    pq = panoptic_quality(pred_instances, true_instances)
    return {
        "dice": dice_score(pred_fg, true_fg),
        "iou": iou_score(pred_fg, true_fg),
        "dice_256": dice_score(pred_small, true_small),
        "iou_256": iou_score(pred_small, true_small),
        "aji": aggregated_jaccard_index(pred_instances, true_instances),
        "pq": pq["pq"],
        "f1": pq["dq"],
    }


def summarise(per_image: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Mean and (population, ``ddof=0``) standard deviation of each score over images.

    Args:
        per_image: one :func:`score_image` result per image, all with the same keys.

    Returns:
        ``{key: {"mean": float, "std": float, "per_image": [float, ...]}}`` in the keys' order.
    """
    if not per_image:
        raise ValueError("no images to summarise")
    keys = list(per_image[0])
    for i, scores in enumerate(per_image):
        if set(scores) != set(keys):
            raise ValueError(f"image {i} has scores {sorted(scores)}, image 0 has {sorted(keys)}")
    summary = {}
    for key in keys:
        values = np.array([float(scores[key]) for scores in per_image], dtype=np.float64)
        summary[key] = {"mean": float(values.mean()), "std": float(values.std()), "per_image": values.tolist()}
    return summary

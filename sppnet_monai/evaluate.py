"""``python -m sppnet_monai evaluate``: accuracy of a trained SPPNet (or a baseline) on a prepared split.

Two click protocols (``protocol``):

- ``"prompted"``: the paper's protocol transposed to windows. Every window of the sliding-window
  grid gets one click drawn by center-neighbourhood point sampling from the ground truth inside it,
  plus a background click; a window whose ground truth holds no nucleus gets an automatic click.
- ``"automatic"``: no ground truth at all: the clicks ``predict`` and the MONAI Label app choose
  (``AutoClickd`` for the image, the inferer's automatic click for every other window).

Scores (see :mod:`sppnet_monai.metrics`): Dice and IoU at native resolution and at the paper's
256x256 protocol, AJI, PQ and object F1 on instances (split by the instance head when the network
has one, else by the distance watershed), for all images and for those whose ground truth
separates touching nuclei (``SEPARATE_NUCLEI_SOURCES``: MoNuSeg's XML outlines), on which alone the
object scores are trustworthy. ``method="classical"`` scores the hematoxylin + Otsu baseline through
the same code; ``prompt_draws`` repeats the random prompt draw to show how much the clicks matter.

Clicked-nucleus Dice (``clicked_dice``, NuClick's task): one center-neighbourhood click on every
ground-truth nucleus, and the Dice of the nucleus returned for it against that nucleus, averaged over
the image's nuclei. A network with a click head returns it from its own channel (``Predictor.clicked_nucleus``);
any other method returns the nucleus of its instance map under the click.
"""

from __future__ import annotations

import copy
import csv
import itertools
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from sppnet_monai.clicks import choose_window
from sppnet_monai.data.image_io import read_mask, read_rgb, write_json, write_png
from sppnet_monai.data.instances import INSTANCE_SOURCE_KEY, SEPARATE_NUCLEI_SOURCES
from sppnet_monai.inferers import window_grid
from sppnet_monai.metrics import dice_score, score_image, summarise
from sppnet_monai.postprocess import instances_from_semantic
from sppnet_monai.predict import DEFAULT_CONFIG, Predictor
from sppnet_monai.transforms import CenterNeighborhoodPointSampled, hematoxylin_mask
from sppnet_monai.utils import SPPNetError, atomic_path
from sppnet_monai.visualize import prompt_overlay
from sppnet_monai.workflows.datasets import datalist_split

logger = logging.getLogger(__name__)

SCORE_KEYS = ("dice", "iou", "dice_256", "iou_256", "aji", "pq", "f1", "clicked_dice")
PROTOCOLS = ("prompted", "automatic")
METHODS = ("network", "classical")


def run_evaluate(
    dataset_dir: str,
    output_dir: str,
    checkpoint: str | None = None,
    split: str = "validation",
    protocol: str = "prompted",
    prompt_draws: int = 1,
    overlays: bool = False,
    seed: int = 0,
    config: str | os.PathLike | Sequence[str] = DEFAULT_CONFIG,
    method: str = "network",
    **overrides,
) -> dict:
    """Score ``checkpoint`` (or the classical ``method``) on ``split`` of a prepared dataset under ``protocol``.

    Writes metrics.json (per image, mean and std, all images and the separately outlined ones),
    metrics.csv and, with ``overlays``, a picture per image.
    """
    if protocol not in PROTOCOLS:
        raise SPPNetError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if method not in METHODS:
        raise SPPNetError(f"method must be one of {METHODS}, got {method!r}.")
    entries = datalist_split(dataset_dir, split)
    predictor = Predictor(checkpoint, config, **overrides) if method == "network" else None
    sampler = CenterNeighborhoodPointSampled() if predictor is None else predictor.parser.get_parsed_content("prompt_sampler")
    # The clicked-nucleus draws have a generator of their own (a copy: the parser returns one shared
    # instance), so the protocols' clicks stay as they were.
    nucleus_sampler = copy.deepcopy(sampler)
    sampler.set_random_state(seed)
    nucleus_sampler.set_random_state(seed)
    draws = prompt_draws if protocol == "prompted" and predictor is not None else 1
    out = Path(output_dir)
    per_image, names, sources, draw_dice = [], [], [], []
    for entry in tqdm(entries, desc=f"evaluate {split} ({protocol})", unit="image"):
        truth = read_mask(entry["label"]).astype(np.int64)
        dice_per_draw = []
        for draw in range(draws):
            if predictor is None:
                image, mask, instances = None, *classical_segmentation(entry["image"])
            else:
                clicks = window_clicks(truth, sampler, predictor) if protocol == "prompted" else {}
                # Later draws only measure how Dice moves with the clicks: no nuclei to split.
                image, mask, instances = segment_with_clicks(predictor, entry["image"], **clicks, split_nuclei=draw == 0)
            if draw == 0:
                scores = score_image(mask, truth, pred_instances=instances)
                scores["clicked_dice"] = clicked_nucleus_dice(predictor, entry["image"], truth, nucleus_sampler, instances)
                per_image.append(scores)
                names.append(Path(entry["image"]).name)
                sources.append(str(entry.get(INSTANCE_SOURCE_KEY, "")))
                if overlays and image is not None:
                    write_png(out / "overlays" / f"{Path(entry['image']).stem}.png", prompt_overlay(image.numpy(), mask, truth > 0))
            dice_per_draw.append(dice_score(mask, truth > 0))
        draw_dice.append(dice_per_draw)
    separated = [i for i, source in enumerate(sources) if source in SEPARATE_NUCLEI_SOURCES]
    report = {
        "checkpoint": str(predictor.checkpoint) if predictor is not None else method,
        "dataset_dir": str(dataset_dir),
        "split": split,
        "protocol": protocol,
        "images": names,
        "instance_sources": sources,
        **summarise(per_image),
        "separate_nuclei_images": summarise([per_image[i] for i in separated]) if separated else None,
    }
    if draws > 1:
        report["prompt_draws"] = _draw_spread(np.asarray(draw_dice))
        _violin_plot(np.asarray(draw_dice), out / "prompt_draws_violin.png")
    write_json(out / "metrics.json", report)
    _write_csv(out / "metrics.csv", names, sources, per_image)
    brief = lambda summary: {key: {"mean": summary[key]["mean"], "std": summary[key]["std"]} for key in SCORE_KEYS}  # noqa: E731
    result = {"split": split, "protocol": protocol, "images": names, **brief(report)}
    if separated:
        result["separate_nuclei_images"] = brief(report["separate_nuclei_images"])
    if draws > 1:
        result["prompt_draws"] = report["prompt_draws"]
    return result


def segment_with_clicks(
    predictor: Predictor, image: str, foreground: list | None = None, background: list | None = None, split_nuclei: bool = True
) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    """The network input ``(5, H, W)``, mask ``(H, W)`` bool and instances ``(H, W)`` int32 (None unless
    ``split_nuclei``) that evaluation scores."""
    prepared = predictor.prepare({"image": image, "foreground": foreground or [], "background": background or []})
    if not split_nuclei:
        return prepared, predictor.segment(prepared), None
    return (prepared, *predictor.segment_instances(prepared))


def window_clicks(truth: np.ndarray, sampler, predictor: Predictor) -> dict:
    """The prompted protocol's clicks: one ground-truth click pair drawn by ``sampler`` in every window.

    Returns ``{"foreground": [[x, y], ...], "background": [[x, y], ...]}`` in image pixels.
    """
    inferer = predictor.inferer
    clicks: dict[str, list] = {"foreground": [], "background": []}
    for rows, cols in window_grid(truth.shape, inferer.roi_size, inferer.overlap):
        drawn = sampler({"label": truth[rows, cols][None]})
        for key in clicks:
            clicks[key] += [[x + cols.start, y + rows.start] for x, y in drawn[key]]
    return clicks


def nucleus_clicks(truth: np.ndarray, sampler: CenterNeighborhoodPointSampled) -> list[tuple[int, list[int]]]:
    """One click per ground-truth nucleus of ``truth`` ``(H, W)``, drawn by ``sampler`` from that nucleus alone:
    ``(id, [x, y])`` in image pixels."""
    clicks = []
    for index, box in enumerate(ndimage.find_objects(truth), start=1):
        if box is None:
            continue
        drawn = sampler({"label": (truth[box] == index)[None].astype(np.uint8)})
        x, y = drawn["foreground"][0]
        clicks.append((index, [x + box[1].start, y + box[0].start]))
    return clicks


def clicked_nucleus_dice(
    predictor: Predictor | None, image: str, truth: np.ndarray, sampler: CenterNeighborhoodPointSampled, instances: np.ndarray | None
) -> float:
    """Mean over the ground-truth nuclei of ``truth`` of the Dice between each nucleus and the nucleus returned for
    one click on it (see the module doc); 1.0 for an image without nuclei."""
    clicks = nucleus_clicks(truth, sampler)
    if not clicks:
        return 1.0
    sizes = np.bincount(truth.ravel())
    height, width = truth.shape
    dice = []
    if predictor is None or predictor.clicked_channel is None:
        # The predicted nucleus under each click: areas counted once, overlaps inside each true nucleus's box.
        pred_area = np.bincount(instances.ravel()) if instances is not None else np.zeros(1, dtype=np.int64)
        boxes = ndimage.find_objects(truth)
        for index, (x, y) in clicks:
            returned = int(instances[y, x]) if instances is not None else 0
            box = boxes[index - 1]
            overlap = np.count_nonzero((truth[box] == index) & (instances[box] == returned)) if returned else 0
            dice.append(2.0 * overlap / ((pred_area[returned] if returned else 0) + sizes[index]))
        return float(np.mean(dice))
    loaded = predictor.load_image({"image": image})
    windows: dict[tuple, list] = {}
    for index, (x, y) in clicks:
        windows.setdefault(choose_window(x, y, width, height, predictor.image_size), []).append((index, x, y))
    for window, members in windows.items():
        x0, y0, w, h = window
        logits = predictor.clicked_logits(loaded, [[x, y] for _, x, y in members], window)
        for (index, x, y), click_logits in zip(members, logits):
            returned = predictor.clicked_nucleus(click_logits, (x - x0, y - y0))
            overlap = np.count_nonzero(returned & (truth[y0 : y0 + h, x0 : x0 + w] == index))
            dice.append(2.0 * overlap / (np.count_nonzero(returned) + sizes[index]))
    return float(np.mean(dice))


# The post-processing settings tune_postprocess varies: the mask threshold, then the instance head's watershed
# (head_postprocess in inference.json).
POSTPROCESS_GRID = {
    "threshold": (0.45, 0.5, 0.55, 0.6, 0.65, 0.7),
    "core_threshold": (0.4, 0.5, 0.6, 0.7, 0.75, 0.8),
    "min_core_size": (4, 16),
    "min_size": (10, 30),
}


def tune_postprocess(predictor: Predictor, entries: Sequence[dict], grid: dict | None = None) -> list[dict]:
    """Mean Dice, AJI, PQ and F1 over ``entries`` (``{"image", "label"}``) of every combination of ``grid``
    (default :data:`POSTPROCESS_GRID`), automatic protocol, sorted by AJI, best first.

    The network runs once per image (with the predictor's ``flip_tta``); each combination then goes through the
    predictor's own rules (:meth:`Predictor.mask`, :meth:`Predictor.split_nuclei`) on the cached logits, so a row
    scores what ``evaluate --protocol automatic`` with those settings scores. All but ``threshold`` are
    ``head_postprocess`` settings: they change nothing for a network without an instance head. The predictor's
    settings are restored afterwards.
    """
    grid = dict(POSTPROCESS_GRID if grid is None else grid)
    unknown = set(grid) - set(POSTPROCESS_GRID)
    if unknown:
        raise SPPNetError(f"tune_postprocess varies {sorted(POSTPROCESS_GRID)}, not {sorted(unknown)}")
    cached = []
    for entry in tqdm(entries, desc="tune_postprocess: network", unit="image"):
        prepared = predictor.prepare({"image": entry["image"], "foreground": [], "background": []})
        cached.append((predictor.logits(prepared).cpu(), read_mask(entry["label"]).astype(np.int64)))
    saved = predictor.threshold, predictor.head_postprocess
    rows = []
    try:
        for combo in itertools.product(*grid.values()):
            setting = dict(zip(grid, combo))
            predictor.set_threshold(setting.get("threshold", saved[0]))
            head = {key: setting[key] for key in ("core_threshold", "min_core_size", "min_size") if key in setting}
            predictor.head_postprocess = {**saved[1], **head}
            scores = []
            for logits, truth in cached:
                mask = predictor.mask(logits)
                scores.append(score_image(mask, truth, pred_instances=predictor.split_nuclei(mask, predictor.head_map(logits))))
            rows.append({**setting, **{key: float(np.mean([s[key] for s in scores])) for key in ("dice", "aji", "pq", "f1")}})
    finally:
        predictor.set_threshold(saved[0])
        predictor.head_postprocess = saved[1]
    return sorted(rows, key=lambda row: row["aji"], reverse=True)


def classical_segmentation(image: str) -> tuple[np.ndarray, np.ndarray]:
    """The classical baseline: haematoxylin (``rgb2hed``) + Gaussian blur + Otsu threshold, then the distance watershed."""
    mask = hematoxylin_mask(np.moveaxis(read_rgb(image), -1, 0).astype(np.float32))
    return mask, instances_from_semantic(mask)


def _draw_spread(draw_dice: np.ndarray) -> dict:
    """``draw_dice`` (images, draws): the mean Dice over images of every draw, and its spread."""
    per_draw = draw_dice.mean(axis=0)
    return {
        "draws": int(draw_dice.shape[1]),
        "mean_dice_per_draw": per_draw.tolist(),
        "min": float(per_draw.min()),
        "max": float(per_draw.max()),
        "range": float(np.ptp(per_draw)),
        "std": float(per_draw.std()),
        "per_image_std": draw_dice.std(axis=1).tolist(),
    }


def _violin_plot(draw_dice: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 4))
    ax.violinplot(draw_dice.mean(axis=0), showmedians=True)
    ax.set_ylabel("mean Dice over images")
    ax.set_xticks([1], [f"{draw_dice.shape[1]} prompt draws"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _write_csv(path: Path, names: list[str], sources: list[str], per_image: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", INSTANCE_SOURCE_KEY, *SCORE_KEYS])
        for name, source, scores in zip(names, sources, per_image):
            writer.writerow([name, source, *(f"{scores[k]:.6f}" for k in SCORE_KEYS)])

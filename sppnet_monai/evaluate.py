"""``python -m sppnet_monai evaluate``: accuracy of a trained SPPNet on a prepared split.

Prompts follow the paper: one click drawn by center-neighbourhood point sampling from the ground
truth (plus a background click) per image. Scores (see :mod:`sppnet_monai.metrics`): Dice and IoU at
native resolution and at the paper's 256x256 protocol, AJI, PQ and object F1 on instances split by
watershed. ``prompt_draws`` repeats the random prompt draw to show how much the click matters.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sppnet_monai.data.image_io import read_mask, write_json, write_png
from sppnet_monai.metrics import dice_score, score_image, summarise
from sppnet_monai.predict import DEFAULT_CONFIG, Predictor
from sppnet_monai.utils import atomic_path
from sppnet_monai.visualize import prompt_overlay
from sppnet_monai.workflows.datasets import datalist_split

logger = logging.getLogger(__name__)

SCORE_KEYS = ("dice", "iou", "dice_256", "iou_256", "aji", "pq", "f1")


def run_evaluate(
    dataset_dir: str,
    output_dir: str,
    checkpoint: str | None = None,
    split: str = "validation",
    prompt_draws: int = 1,
    overlays: bool = False,
    seed: int = 0,
    config: str | os.PathLike = DEFAULT_CONFIG,
    **overrides,
) -> dict:
    """Score ``checkpoint`` on ``split`` of a prepared dataset; writes metrics.json, metrics.csv (and overlays)."""
    entries = datalist_split(dataset_dir, split)
    predictor = Predictor(checkpoint, config, **overrides)
    sampler = predictor.parser.get_parsed_content("prompt_sampler")
    sampler.set_random_state(seed)
    out = Path(output_dir)
    per_image, names, draw_dice = [], [], []
    for entry in tqdm(entries, desc=f"evaluate {split}", unit="image"):
        truth = read_mask(entry["label"]).astype(np.int64)
        dice_per_draw = []
        for draw in range(prompt_draws):
            clicks = sampler({"label": truth[None]})
            image, mask = segment_with_clicks(predictor, entry["image"], clicks["foreground"], clicks["background"])
            if draw == 0:
                per_image.append(score_image(mask, truth, predictor.instance_postprocess))
                names.append(Path(entry["image"]).name)
                if overlays:
                    write_png(out / "overlays" / f"{Path(entry['image']).stem}.png", prompt_overlay(image.numpy(), mask, truth > 0))
            dice_per_draw.append(dice_score(mask, truth > 0))
        draw_dice.append(dice_per_draw)
    summary = summarise(per_image)
    report = {"checkpoint": str(predictor.checkpoint), "dataset_dir": str(dataset_dir), "split": split, "images": names, **summary}
    if prompt_draws > 1:
        report["prompt_draws"] = _draw_spread(np.asarray(draw_dice))
        _violin_plot(np.asarray(draw_dice), out / "prompt_draws_violin.png")
    write_json(out / "metrics.json", report)
    _write_csv(out / "metrics.csv", names, per_image)
    return {k: v for k, v in report.items() if k in ("split", "images")} | {
        key: {"mean": summary[key]["mean"], "std": summary[key]["std"]} for key in SCORE_KEYS
    } | ({"prompt_draws": report["prompt_draws"]} if prompt_draws > 1 else {})


def segment_with_clicks(predictor: Predictor, image: str, foreground: list, background: list) -> tuple[torch.Tensor, np.ndarray]:
    """The network input ``(5, H, W)`` and the mask ``(H, W)`` bool that evaluation scores, for ground-truth clicks."""
    prepared = predictor.prepare({"image": image, "foreground": foreground, "background": background})
    return prepared, predictor.segment(prepared)


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


def _write_csv(path: Path, names: list[str], per_image: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *SCORE_KEYS])
        for name, scores in zip(names, per_image):
            writer.writerow([name, *(f"{scores[k]:.6f}" for k in SCORE_KEYS)])

"""Where a model's pixel errors lie, image by image: nuclei drawn too wide, too narrow, missed, or false.

Usage:
    python scripts/pixel_errors.py PREPARED_DIR PREDICTIONS_DIR [PREDICTIONS_DIR ...]

PREDICTIONS_DIR holds ``predict``'s ``<name>_mask.png`` for (some of) the images of PREPARED_DIR/labels
(instance maps, as ``prepare`` writes them). For every image and model it prints Dice, precision, recall,
the predicted area over the annotated area, the false-positive pixels that touch an annotated nucleus (its
outline drawn too wide) against those in components away from every nucleus (false nuclei), and the
nuclei less than 20% covered (missed) with their mean grey level beside that of the found ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage import io, measure

# A nucleus or predicted component less than this fraction covered by the other side counts as missed / false.
COVERED = 0.2


def pixel_errors(label: np.ndarray, mask: np.ndarray, grey: np.ndarray) -> dict:
    """Error breakdown of a binary ``mask`` (H, W) against an instance ``label`` (H, W); ``grey`` (H, W) the image."""
    truth = label > 0
    tp, fp, fn = (mask & truth).sum(), (mask & ~truth).sum(), (~mask & truth).sum()
    nuclei = measure.regionprops(label)
    coverage = np.array([mask[tuple(n.coords.T)].mean() for n in nuclei])
    missed = coverage < COVERED
    false_pixels = sum(c.area for c in measure.regionprops(measure.label(mask)) if truth[tuple(c.coords.T)].mean() < COVERED)
    return {
        "dice": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "area_ratio": mask.sum() / max(truth.sum(), 1),
        "fp_touching": int(fp - false_pixels),
        "fp_false_nuclei": int(false_pixels),
        "fn": int(fn),
        "missed": f"{missed.sum()}/{len(nuclei)}",
        "grey_missed": float(np.mean([grey[tuple(n.coords.T)].mean() for n, m in zip(nuclei, missed) if m])) if missed.any() else float("nan"),
        "grey_found": float(np.mean([grey[tuple(n.coords.T)].mean() for n, m in zip(nuclei, missed) if not m])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("predictions", type=Path, nargs="+")
    args = parser.parse_args()
    for mask_path in sorted(args.predictions[0].glob("*_mask.png")):
        name = mask_path.name[: -len("_mask.png")]
        label = io.imread(args.prepared_dir / "labels" / f"{name}.png")
        grey = io.imread(args.prepared_dir / "images" / f"{name}.png")[..., :3].mean(-1)
        for predictions in args.predictions:
            scores = pixel_errors(label, io.imread(predictions / mask_path.name) > 0, grey)
            print(f"{name} {predictions}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


if __name__ == "__main__":
    main()

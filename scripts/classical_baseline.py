"""Dice of the classical hematoxylin + Gaussian blur + Otsu baseline on a prepared split.

Usage: python scripts/classical_baseline.py DATASET_DIR [--split validation] [--crop 256]

``--crop`` scores the centre crop that the bundle's validation sees at that ``image_size`` (0 = whole image),
so the baseline and a trained network are compared on the same pixels.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sppnet_monai.data.image_io import read_mask, read_rgb
from sppnet_monai.transforms import hematoxylin_mask
from sppnet_monai.workflows import datalist_split


def centre_crop(array: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return array
    rows, cols = array.shape[:2]
    top, left = max((rows - size) // 2, 0), max((cols - size) // 2, 0)
    return array[top : top + size, left : left + size]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--crop", type=int, default=0)
    args = parser.parse_args()
    scores = {}
    for entry in datalist_split(args.dataset_dir, args.split):
        rgb = centre_crop(read_rgb(entry["image"]), args.crop)
        truth = centre_crop(read_mask(entry["label"]), args.crop) > 0
        scores[entry["image"]] = dice(hematoxylin_mask(np.moveaxis(rgb, -1, 0).astype(np.float32)), truth)
    values = np.array(list(scores.values()))
    print(json.dumps({"split": args.split, "crop": args.crop, "dice_mean": values.mean(), "dice_std": values.std(), "per_image": scores}, indent=2))


if __name__ == "__main__":
    main()

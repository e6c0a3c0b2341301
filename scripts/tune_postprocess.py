"""Choose the bundle's post-processing (mask threshold, instance-head cores, smallest nucleus) on a split.

Usage:
    python scripts/tune_postprocess.py PREPARED_DIR OUTPUT_JSON [--checkpoint CKPT] [--unet] [--split validation] [--flip_tta]
        [--core_threshold 0.2 0.3 ...]

Scores every combination of ``sppnet_monai.evaluate.POSTPROCESS_GRID`` on the split under the automatic
protocol (:func:`sppnet_monai.evaluate.tune_postprocess`: the network runs once per image), prints the
current settings' row and the best rows by mean AJI (``--core_threshold`` replaces the grid's core thresholds,
e.g. for an ``hv`` head, whose edge map has a scale of its own), and writes every row to OUTPUT_JSON. Choose on
validation images only: the held-out test images must not take part. The chosen values go into
``head_postprocess`` and ``threshold`` of ``bundle/configs/inference.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sppnet_monai.evaluate import POSTPROCESS_GRID, tune_postprocess
from sppnet_monai.predict import DEFAULT_CONFIG, UNET_CONFIG, Predictor
from sppnet_monai.workflows.datasets import datalist_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("output_json")
    parser.add_argument("--checkpoint", default=None, help="SPPNet checkpoint (default: the shipped model)")
    parser.add_argument("--unet", action="store_true", help="the checkpoint is the U-Net baseline's model.pt")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--flip_tta", action="store_true", help="average the logits of the image and its flips")
    parser.add_argument("--core_threshold", type=float, nargs="+", default=None, help="core thresholds to search instead of the grid's")
    args = parser.parse_args()
    predictor = Predictor(args.checkpoint, UNET_CONFIG if args.unet else DEFAULT_CONFIG, flip_tta=args.flip_tta)
    current = {"threshold": predictor.threshold, **predictor.head_postprocess}
    grid = {**POSTPROCESS_GRID, **({"core_threshold": tuple(args.core_threshold)} if args.core_threshold else {})}
    rows = tune_postprocess(predictor, datalist_split(args.dataset_dir, args.split), grid)
    print("current settings:", json.dumps(next((r for r in rows if all(r[k] == v for k, v in current.items())), current)))
    for row in rows[:10]:
        print(json.dumps(row))
    record = {"checkpoint": str(predictor.checkpoint), "split": args.split, "flip_tta": args.flip_tta, "grid": grid, "rows": rows}
    Path(args.output_json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

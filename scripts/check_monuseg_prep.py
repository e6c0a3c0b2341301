"""Developer check of ``python -m sppnet_monai prepare monuseg SRC DST`` on the real MoNuSeg data.

For every image with an XML it prints the XML region count (counted here, independently of
the preparation code), the instance count of ``DST/labels/<stem>.png``, the degenerate and
overwritten polygons reported in ``DST/prepare_summary.json``, and the Dice between the
binary of the instance map and the distributed ``SRC/Binary_masks/<stem>.png``. Exits 1 if
an instance count does not add up or a Dice is below ``--min_dice``.

    python scripts/check_monuseg_prep.py /work/shared/data/monuseg/MoNuSegTrainingData /tmp/monuseg_prepared
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays of the same shape."""
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="MoNuSegTrainingData folder")
    parser.add_argument("dst", type=Path, help="output of 'prepare monuseg'")
    parser.add_argument("--min_dice", type=float, default=0.95)
    args = parser.parse_args()

    summary = json.loads((args.dst / "prepare_summary.json").read_text())
    images = summary["images"]
    num_tifs = len(list((args.src / "Tissue_Images").glob("*.tif")) + list((args.src / "Tissue Images").glob("*.tif")))
    num_pngs = len(list((args.dst / "images").glob("*.png")))
    print(f"tif images in SRC: {num_tifs}, prepared: {len(images)} ({num_pngs} PNGs), counts: {summary['counts']}")
    ok = len(images) == num_tifs

    header = f"{'image':28s} {'regions':>7s} {'instances':>9s} {'degen':>5s} {'overwr':>6s} {'dice':>7s}"
    print(header)
    for xml_path in sorted((args.src / "Annotations").glob("*.xml")):
        stem = xml_path.stem
        regions = sum(1 for _ in ET.parse(xml_path).getroot().iter("Region"))
        labels = np.asarray(Image.open(args.dst / "labels" / f"{stem}.png"))
        instances = int(np.count_nonzero(np.unique(labels)))
        info = images[stem]
        degenerate, overwritten = info["degenerate_polygons"], info["overwritten_polygons"]
        reference = np.asarray(Image.open(args.src / "Binary_masks" / f"{stem}.png")) > 0
        score = dice(labels > 0, reference)
        counts_ok = instances == regions - degenerate - overwritten == info["num_instances"]
        ok &= counts_ok and score >= args.min_dice and info["instances"] == "xml"
        flag = "" if counts_ok and score >= args.min_dice else "  <-- FAIL"
        print(f"{stem:28s} {regions:7d} {instances:9d} {degenerate:5d} {overwritten:6d} {score:7.4f}{flag}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

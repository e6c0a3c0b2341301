"""The annotation loop as a pathologist lives it, over HTTP against the MONAI Label app, on real tissue.

For each image of a prepared dataset's validation split (MoNuSeg: 6 images of 1000 x 1000 that training never
saw), two 512 x 512 patches along its top (x 0 and x 488) are submitted as QuPath's *Submit Label* does: the patch
PNG (``PUT /datastore/image``, id ``<image>-patch-<x>_<y>_<w>_<h>``) and its ground truth as ASAP XML
(``PUT /datastore/label``). Then ``POST /train/sppnet`` (run_sync) fine-tunes the served model on them, gated on the
held-back patches. Dice / AJI are measured on the rest of those images (rows 512-999, never submitted) with the
served model before and after, by the project's own pixel path (automatic protocol).

Prints one JSON report with the wall time of each step. Run it with the MONAI Label environment's python:

    .venv-monailabel/bin/python scripts/annotation_loop.py runs/monuseg OUT_DIR [--max_epochs 10]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))
from serve import running_server  # noqa: E402

PATCH = 512
PATCH_ORIGINS = [(0, 0), (488, 0)]  # along the top; the rows below PATCH are scored
REST = np.s_[PATCH:, :]


def score_rest(checkpoint: Path, bundle: Path, entries: list[dict]) -> dict:
    """Mean Dice / AJI of ``checkpoint`` on the rows of each image below the submitted patches."""
    from sppnet_monai.data.image_io import read_mask
    from sppnet_monai.evaluate import segment_with_clicks
    from sppnet_monai.metrics import aggregated_jaccard_index, dice_score
    from sppnet_monai.predict import Predictor

    predictor = Predictor(str(checkpoint), bundle / "configs" / "inference.json")
    dice, aji = [], []
    for entry in entries:
        truth = read_mask(entry["label"]).astype(np.int64)
        _, mask, instances = segment_with_clicks(predictor, entry["image"])
        dice.append(dice_score(mask[REST], truth[REST] > 0))
        aji.append(aggregated_jaccard_index(instances[REST], truth[REST]))
    return {"dice": round(float(np.mean(dice)), 4), "aji": round(float(np.mean(aji)), 4), "per_image_dice": [round(float(d), 4) for d in dice]}


def main() -> None:
    from sppnet_monai.data.image_io import read_mask, read_rgb
    from sppnet_monai.data.labels import instances_to_asap_xml
    from sppnet_monai.workflows.datasets import datalist_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--max_epochs", type=int, default=10)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    entries = datalist_split(args.dataset_dir, "validation")
    studies, bundle = out / "studies", out / "bundle"
    for folder in (studies, bundle):
        shutil.rmtree(folder, ignore_errors=True)
    studies.mkdir()
    for entry in entries:
        shutil.copy(entry["image"], studies / Path(entry["image"]).name)
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    shutil.copytree(REPO / "bundle" / "weights", bundle / "weights")
    shipped = bundle / "weights" / "sppnet_monuseg.pt"

    started = time.perf_counter()
    before = score_rest(shipped, bundle, entries)
    scored = time.perf_counter()
    with running_server(out, studies, bundle) as (url, _):
        up = time.perf_counter()
        for entry in entries:
            image, truth = read_rgb(entry["image"]), read_mask(entry["label"]).astype(np.int64)
            stem = Path(entry["image"]).stem
            for x, y in PATCH_ORIGINS:
                patch_id = f"{stem}-patch-{x}_{y}_{PATCH}_{PATCH}"
                buffer = io.BytesIO()
                Image.fromarray(image[y : y + PATCH, x : x + PATCH]).save(buffer, format="PNG")
                requests.put(f"{url}/datastore/image", params={"image": patch_id}, files={"file": ("patch.png", buffer.getvalue())}, timeout=120).raise_for_status()
                xml = instances_to_asap_xml(truth[y : y + PATCH, x : x + PATCH], x, y)
                saved = requests.put(f"{url}/datastore/label", params={"image": patch_id, "tag": "final"}, files={"label": (f"{patch_id}.xml", xml)}, timeout=120)
                saved.raise_for_status()
        submitted = time.perf_counter()
        trained = requests.post(f"{url}/train/sppnet", params={"run_sync": "true"}, json={"max_epochs": args.max_epochs}, timeout=7200)
        trained.raise_for_status()
        result = trained.json()
        done = time.perf_counter()
    served = bundle / "models" / "model.pt"
    after = score_rest(served if served.is_file() else shipped, bundle, entries)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0))},
        "images": [Path(e["image"]).name for e in entries],
        "patches_submitted": len(entries) * len(PATCH_ORIGINS),
        "scored_area": f"rows {PATCH}-end of each image (never submitted)",
        "before": before,
        "after": after,
        "train_result": result,
        "wall_s": {
            "server_start": round(up - scored, 1), "submit_patches_and_labels": round(submitted - up, 1),
            "train": round(done - submitted, 1), "loop_total": round(done - up, 1), "scoring_before": round(scored - started, 1),
        },
    }
    (out / "annotation_loop.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

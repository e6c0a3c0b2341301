"""Click latency of the MONAI Label app on real tissue, alone and while a 4096 x 4096 rectangle is segmented.

Tiles 25 MoNuSeg training images (1000 x 1000 H&E) into a 5000 x 5000 pyramidal TIFF, starts the app
(``monailabel_app``, the bundle's shipped model) on 127.0.0.1 and times, from send to parsed answer, QuPath's
click tool request (``/infer/wsi/sppnet_click?output=asap``, a 128 x 128 patch around the click, tile 128):

- 40 clicks on a cached window (a few pixels apart) and 40 on new windows (512 px apart);
- 40 clicks on new windows while a 4096 x 4096 rectangle (``/infer/wsi/sppnet``, tile 1024, as QuPath's
  *Annotations* command sends it) runs in another connection; the rectangle's own time alone and under the
  clicks, and ``GET /info/`` during it.

Prints one JSON report (median and p90 in milliseconds). Run it with the MONAI Label environment's python:

    .venv-monailabel/bin/python scripts/tissue_click_latency.py OUT_DIR [MONUSEG_TISSUE_IMAGES_FOLDER]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))
from serve import running_server  # noqa: E402

GRID, SIDE = 5, 1000
RECTANGLE = 4096
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "monuseg" / "MoNuSegTrainingData" / "Tissue_Images"


def _mosaic(images: Path) -> np.ndarray:
    from sppnet_monai.data.image_io import read_rgb

    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png"))[: GRID * GRID]
    if len(paths) < GRID * GRID:
        raise SystemExit(f"{images}: need {GRID * GRID} images, found {len(paths)}")
    tiles = [read_rgb(p)[:SIDE, :SIDE] for p in paths]
    return np.concatenate([np.concatenate(tiles[r * GRID : (r + 1) * GRID], 1) for r in range(GRID)], 0)


def _click(url: str, x: int, y: int) -> float:
    body = {
        "level": 0, "location": [x - 64, y - 64], "size": [128, 128], "tile_size": [128, 128], "min_poly_area": 30,
        "params": {"foreground": [[x, y]], "background": [], "max_workers": 1},
    }
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/wsi/sppnet_click", params={"output": "asap", "image": "tissue"}, json=body, timeout=600)
    response.raise_for_status()
    assert "<ASAP_Annotations>" in response.text
    return time.perf_counter() - start


def _rectangle(url: str, x: int, y: int) -> float:
    body = {"level": 0, "location": [x, y], "size": [RECTANGLE, RECTANGLE], "tile_size": [1024, 1024], "min_poly_area": 30, "params": {"max_workers": 1}}
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/wsi/sppnet", params={"output": "asap", "image": "tissue"}, json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - start


def _stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "median_ms": round(float(np.median(ms)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1), "max_ms": round(float(ms.max()), 1)}


def main(out: Path, images: Path = DEFAULT_IMAGES) -> None:
    from sppnet_monai.data.synthetic import write_pyramidal_tiff

    out.mkdir(parents=True, exist_ok=True)
    studies = out / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    studies.mkdir()
    mosaic = _mosaic(images)
    size = mosaic.shape[0]

    def read_region(origin, extent):
        (x, y), (w, h) = origin, extent
        region = np.full((h, w, 3), 255, np.uint8)
        part = mosaic[y : y + h, x : x + w]
        region[: part.shape[0], : part.shape[1]] = part
        return region

    write_pyramidal_tiff(studies / "tissue.tif", size, size, read_region, levels=3, tile=256, mpp=0.25)
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    shutil.copytree(REPO / "bundle" / "weights", bundle / "weights")
    rng = np.random.default_rng(0)
    new_windows = [(300 + 512 * (i % 9), 300 + 512 * (i // 9)) for i in range(81)]
    with running_server(out, studies, bundle) as (url, _):
        for _ in range(3):  # warm-up
            _click(url, 2500, 2500)
        cached = [_click(url, 2500 + int(rng.integers(-8, 9)), 2500 + int(rng.integers(-8, 9))) for _ in range(40)]
        new = [_click(url, *xy) for xy in new_windows[:40]]
        alone = _rectangle(url, 0, 0)
        during, info, rectangle = [], [], {}
        worker = threading.Thread(target=lambda: rectangle.setdefault("seconds", _rectangle(url, size - RECTANGLE, size - RECTANGLE)))
        worker.start()
        time.sleep(1.0)
        for xy in new_windows[40:80]:
            if not worker.is_alive():
                break
            during.append(_click(url, *xy))
            start = time.perf_counter()
            requests.get(f"{url}/info/", timeout=600).raise_for_status()
            info.append(time.perf_counter() - start)
        clicks_inside = len(during)
        worker.join()
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0))},
        "slide": f"{size}x{size} pyramidal TIFF of {GRID * GRID} MoNuSeg training images",
        "click_cached_window": _stats(cached),
        "click_new_window": _stats(new),
        f"rectangle_{RECTANGLE}_alone_s": round(alone, 1),
        f"click_new_window_during_rectangle_{RECTANGLE}": _stats(during) if during else None,
        "get_info_during_rectangle": _stats(info) if info else None,
        f"rectangle_{RECTANGLE}_with_{clicks_inside}_clicks_s": round(rectangle.get("seconds", float("nan")), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tissue_click_latency").resolve(), *(Path(a) for a in sys.argv[2:3]))

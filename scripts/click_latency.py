"""Click-to-answer latency of the MONAI Label app over HTTP, and its memory over many clicks.

Starts the app (``monailabel_app``, the bundle's shipped model) on 127.0.0.1 with generated data:
three H&E-like slides (pyramidal tiled TIFF, 3072 x 3072) and one 1000 x 1000 PNG. Then, timing
each request from send to parsed answer:

- QuPath's click tool on a slide (``/infer/wsi/sppnet_click?output=asap``, a 128 x 128 patch
  around the click, tile 128, as ``InteractorTool.java`` builds it): 50 clicks on new windows
  (first click: read + encode + decode + post-process of one 256 window) and 50 clicks on a cached
  window (clicks a few pixels apart in the same window);
- the app's own ``/infer/sppnet`` on the 1000 x 1000 PNG: 50 cached clicks;
- 200 clicks spread over the 3 slides, with the server's RSS before and after.

Prints one JSON report (median and p90 in milliseconds, RSS in MiB, the machine). Run it with the
MONAI Label environment's python (README):

    .venv-monailabel/bin/python scripts/click_latency.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))
from serve import rss_kib, running_server  # noqa: E402

SLIDE = 3072


def _centres(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(30, SLIDE - 30, 50), np.arange(30, SLIDE - 30, 50))
    return np.stack([xs.ravel(), ys.ravel()], 1) + rng.uniform(-8, 8, (xs.size, 2))


def _click(url: str, image: str, x: int, y: int) -> float:
    body = {
        "level": 0, "location": [x - 64, y - 64], "size": [128, 128], "tile_size": [128, 128], "min_poly_area": 30,
        "params": {"foreground": [[x, y]], "background": [], "max_workers": 1},
    }
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/wsi/sppnet_click", params={"output": "asap", "image": image}, json=body, timeout=60)
    response.raise_for_status()
    assert "<ASAP_Annotations>" in response.text
    return time.perf_counter() - start


def _stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "median_ms": round(float(np.median(ms)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1)}


def main(out: Path) -> None:
    from PIL import Image

    from sppnet_monai.data.synthetic import nuclei_slide_tile, write_nuclei_slide

    out.mkdir(parents=True, exist_ok=True)
    studies = out / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    studies.mkdir()
    for index in range(3):
        write_nuclei_slide(studies / f"slide{index}.tif", SLIDE, SLIDE, _centres(index), radius=9.0, levels=3, tile=256)
    Image.fromarray(nuclei_slide_tile((0, 0), (1000, 1000), _centres(0), 9.0)).save(studies / "image.png")
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    shutil.copytree(REPO / "bundle" / "weights", bundle / "weights")
    rng = np.random.default_rng(0)
    with running_server(out, studies, bundle) as (url, proc):
        for _ in range(3):  # warm-up: first-call costs of torch, the allocator, the HTTP stack
            _click(url, "slide0", 1500, 1500)
        # New windows: clicks 512 px apart never share a 256 window.
        new = [_click(url, "slide1", 200 + 512 * (i % 5), 200 + 512 * (i // 5)) for i in range(25)]
        new += [_click(url, "slide2", 200 + 512 * (i % 5), 200 + 512 * (i // 5)) for i in range(25)]
        cached = [_click(url, "slide0", 1500 + int(rng.integers(-8, 9)), 1500 + int(rng.integers(-8, 9))) for _ in range(50)]
        plain = []
        for i in range(51):
            start = time.perf_counter()
            response = requests.post(
                f"{url}/infer/sppnet", params={"image": "image", "output": "json"},
                data={"params": json.dumps({"foreground": [[500 + i % 5, 500]]})}, timeout=60,
            )
            response.raise_for_status()
            plain.append(time.perf_counter() - start)
        before = rss_kib(proc.pid)
        for i in range(200):
            x, y = rng.integers(100, SLIDE - 100, 2)
            _click(url, f"slide{i % 3}", int(x), int(y))
        after = rss_kib(proc.pid)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0))},
        "qupath_click_new_window": _stats(new),
        "qupath_click_cached_window": _stats(cached),
        "infer_sppnet_1000px_png_cached": _stats(plain[1:]),
        "server_rss_200_clicks_3_slides_mib": {"before": round(before / 1024, 1), "after": round(after / 1024, 1), "growth": round((after - before) / 1024, 1)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/click_latency").resolve())

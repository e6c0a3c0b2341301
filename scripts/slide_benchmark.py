"""Whole-slide ``predict`` at scale: peak memory and throughput for a 2048² and an 8192² region.

Generates a pyramidal tiled TIFF (8192 x 8192, JPEG-free deflate tiles, 3 levels, 0.25 um/px) with
haematoxylin disks on a grid, some centred exactly on the 1024-pixel tile borders, then runs
``python -m sppnet_monai predict --formats geojson`` on both regions, each in its own process, and
checks the 8192² output: the GeoJSON loads with shapely, every polygon is valid, the nuclei count
equals the CSV's and the summary's, and every disk (those across tile borders included) comes back
exactly once. Then a 4096² slide with nuclei only in a central disk of tissue (38% of its area, the rest
glass) is segmented with and without skipping glass windows (``min_stain_density``): time of each, and
whether the nuclei in the tissue are the same. Prints one JSON report (peak RSS of each run and their
ratio, MP/s, nuclei/s, the glass comparison).

    python scripts/slide_benchmark.py OUT_DIR [--size 8192] [--small 2048] [--glass 4096]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TILE = 1024  # the inference config's slide_inference.tile_size


def disk_centres(size: int, spacing: int = 64, radius: float = 9.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(spacing // 2, size - spacing // 2, spacing), np.arange(spacing // 2, size - spacing // 2, spacing))
    centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(float) + rng.uniform(-8, 8, (xs.size, 2))
    # Disks on tile borders: x or y exactly a multiple of the tile size.
    borders = np.arange(TILE, size, TILE)
    on_border = np.array([[b, y] for b in borders for y in range(40, size - 40, 300)] + [[x, b] for b in borders for x in range(70, size - 40, 300)], float)
    keep = np.min(np.hypot(*(centres[:, None] - on_border[None]).transpose(2, 0, 1)), axis=1) > 3 * radius
    return np.vstack([centres[keep], on_border])


def child(slide: str, out: str, region: str, overrides: str = "{}") -> None:
    """One predict run in this process; prints its summary and this process's peak RSS."""
    from sppnet_monai.predict import run_predict

    summary = run_predict(slide, out, formats="geojson", region=region, **json.loads(overrides))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"summary": summary, "peak_rss_mib": round(peak_kib / 1024, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--small", type=int, default=2048)
    parser.add_argument("--glass", type=int, default=4096)
    parser.add_argument("--child", nargs=4, metavar=("SLIDE", "OUT", "REGION", "OVERRIDES"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from sppnet_monai.data.synthetic import write_nuclei_slide

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide = out / "benchmark_slide.tif"
    centres = disk_centres(args.size)
    start = time.perf_counter()
    write_nuclei_slide(slide, args.size, args.size, centres, radius=9.0, levels=3, tile=256, mpp=0.25)
    report = {
        "machine": {"platform": platform.platform(), "cpus": len(__import__("os").sched_getaffinity(0))},
        "slide": {"size": args.size, "disks": len(centres), "seconds_to_write": round(time.perf_counter() - start, 1)},
        "runs": {},
    }
    for side in (args.small, args.size):
        result = run_child(slide, out / f"region_{side}", f"0,0,{side},{side}")
        image = result["summary"]["images"][str(slide)]
        report["runs"][side] = {"peak_rss_mib": result["peak_rss_mib"], "nuclei": image["nuclei"], "tiles": image["tiles"], **result["summary"]["throughput"]}
    report["rss_ratio_large_to_small"] = round(report["runs"][args.size]["peak_rss_mib"] / report["runs"][args.small]["peak_rss_mib"], 3)

    import shapely

    large = out / f"region_{args.size}"
    features = json.loads((large / "benchmark_slide_nuclei.geojson").read_text())["features"]
    polygons = [shapely.geometry.shape(f["geometry"]) for f in features]
    rows = sum(1 for _ in csv.DictReader(open(large / "benchmark_slide_nuclei.csv")))
    found = np.array([p.centroid.coords[0] for p in polygons])
    matches = np.zeros(len(centres), int)
    for index, centre in enumerate(centres):  # per disk: polygons whose centroid is within 3 px
        matches[index] = int((np.hypot(*(found - centre).T) < 3).sum())
    border = len(centres) - int(np.sum(np.all(centres % TILE != 0, axis=1)))
    report["checks"] = {
        "features": len(features),
        "all_polygons_valid": all(p.is_valid for p in polygons),
        "csv_rows_equal_features": rows == len(features) == report["runs"][args.size]["nuclei"],
        "disks_found_once": int((matches == 1).sum()),
        "disks_found_twice_or_more": int((matches > 1).sum()),
        "disks_missed": int((matches == 0).sum()),
        "border_disks": border,
        "border_disks_found_once": int((matches[-border:] == 1).sum()),
    }
    report["glass"] = glass_comparison(out, args.glass)
    print(json.dumps(report, indent=2))


def run_child(slide: Path, out: Path, region: str, overrides: dict | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, str(out.parent), "--child", str(slide), str(out), region, json.dumps(overrides or {})],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def glass_comparison(out: Path, size: int) -> dict:
    """The same slide of tissue and glass with and without skipping glass windows (no window cache)."""
    import shapely

    from sppnet_monai.data.synthetic import write_nuclei_slide

    centres = disk_centres(size)
    tissue_radius = 0.35 * size
    centres = centres[np.hypot(*(centres - size / 2).T) < tissue_radius]
    slide = out / "glass_slide.tif"
    write_nuclei_slide(slide, size, size, centres, radius=9.0, levels=3, tile=256, mpp=0.25)
    report: dict = {"size": size, "tissue_fraction": round(np.pi * tissue_radius**2 / size**2, 3), "disks": len(centres)}
    # Without the window cache in both runs: it would also spare the glass windows here, which are all
    # alike on this noiseless synthetic background (on a scanned slide glass windows differ).
    no_cache = {"slide_inference#window_cache_mib": 0}
    for name, overrides in (("skip_glass", no_cache), ("every_window", {"min_stain_density": None, **no_cache})):
        run_out = out / f"glass_{name}"
        result = run_child(slide, run_out, f"0,0,{size},{size}", overrides)
        features = json.loads((run_out / "glass_slide_nuclei.geojson").read_text())["features"]
        centroids = np.array([shapely.geometry.shape(f["geometry"]).centroid.coords[0] for f in features])
        on_disk = np.array([np.hypot(*(centroids - c).T).min() < 3 for c in centres])
        report[name] = {
            "seconds": result["summary"]["throughput"]["seconds"], "nuclei": len(features),
            "disks_found": int(on_disk.sum()), "nuclei_off_disks": int(sum(np.hypot(*(centres - c).T).min() >= 3 for c in centroids)),
        }
    report["speedup"] = round(report["every_window"]["seconds"] / report["skip_glass"]["seconds"], 2)
    return report


if __name__ == "__main__":
    main()

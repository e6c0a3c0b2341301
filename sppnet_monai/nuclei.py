"""Nuclei as polygons with measurements, and their export as QuPath GeoJSON and CSV.

One record per nucleus of an instance map: ``{"id", "area", "centroid", "contour"}`` in the
coordinates of the caller's choice (``origin + scale * map pixel``: slide level-0 pixels for a
region read at a coarser level). The MONAI Label app answers these records (its ``annotation``
contours) and ``predict`` streams them into a GeoJSON FeatureCollection that QuPath imports as
detections (drag and drop), plus a CSV of the same measurements.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import shapely
from skimage import measure

from sppnet_monai.utils import atomic_path

__all__ = ["CSV_COLUMNS", "NUCLEUS_CLASS", "geojson_feature", "nuclei_records", "write_nuclei"]

# QuPath's class for the detections, with the colour it draws them in.
NUCLEUS_CLASS = {"name": "Nucleus", "color": [230, 60, 60]}
CSV_COLUMNS = ("id", "centroid_x_px", "centroid_y_px", "area_px2", "centroid_x_um", "centroid_y_um", "area_um2")


def _outline(region_mask: np.ndarray) -> np.ndarray | None:
    """``(N, 2)`` x, y of the outer outline of one nucleus's ``(h, w)`` bool mask, a valid simple polygon (None if degenerate)."""
    contours = measure.find_contours(np.pad(region_mask, 1).astype(np.uint8), 0.5)
    if not contours:
        return None
    ring = measure.approximate_polygon(max(contours, key=len), tolerance=0.5)[:, ::-1] - 1  # (row, col) -> (x, y)
    if len(ring) < 4:
        return None
    polygon = shapely.Polygon(ring)
    if not polygon.is_valid:  # simplification can fold a thin neck onto itself: keep the largest valid piece
        valid = shapely.make_valid(polygon)
        pieces = [g for g in getattr(valid, "geoms", [valid]) if isinstance(g, shapely.Polygon)]
        if not pieces:
            return None
        polygon = max(pieces, key=lambda g: g.area)
    if polygon.is_empty or polygon.area <= 0:
        return None
    return np.asarray(polygon.exterior.coords)


def nuclei_records(
    instances: np.ndarray,
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    keep: Callable[[float, float], bool] | None = None,
) -> list[dict]:
    """One record per label of ``instances`` ``(H, W)`` whose centroid ``keep(x, y)`` accepts (in map pixels).

    ``contour`` is a closed ring ``[[x, y], ...]`` (first point repeated last), ``centroid`` ``[x, y]`` and
    ``area`` in output pixels: ``origin + scale * (map x, map y)`` and ``scale**2 *`` pixel count.
    """
    records = []
    ox, oy = origin
    for region in measure.regionprops(instances):
        cy, cx = region.centroid
        if keep is not None and not keep(cx, cy):
            continue
        outline = _outline(region.image)
        if outline is None:
            continue
        r0, c0, _, _ = region.bbox
        contour = [[round(ox + scale * (x + c0), 1), round(oy + scale * (y + r0), 1)] for x, y in outline]
        records.append(
            {
                "id": int(region.label),
                "area": round(float(region.area) * scale * scale, 2),
                "centroid": [round(ox + scale * cx, 1), round(oy + scale * cy, 1)],
                "contour": contour,
            }
        )
    return records


def _measurements(record: dict, mpp: tuple[float, float] | None) -> dict:
    (x, y), area = record["centroid"], record["area"]
    values = {"centroid_x_px": x, "centroid_y_px": y, "area_px2": area}
    if mpp is not None:
        values.update(
            centroid_x_um=round(x * mpp[0], 3), centroid_y_um=round(y * mpp[1], 3), area_um2=round(area * mpp[0] * mpp[1], 3)
        )
    return values


# QuPath's names for the measurements it shows in its detection table.
_QUPATH_NAMES = {
    "centroid_x_px": "Centroid X px",
    "centroid_y_px": "Centroid Y px",
    "area_px2": "Area px^2",
    "centroid_x_um": "Centroid X µm",
    "centroid_y_um": "Centroid Y µm",
    "area_um2": "Area µm^2",
}


def geojson_feature(record: dict, mpp: tuple[float, float] | None = None) -> dict:
    """The GeoJSON Feature QuPath imports as one nucleus detection (class ``Nucleus``, with measurements)."""
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [record["contour"]]},
        "properties": {
            "objectType": "detection",
            "classification": NUCLEUS_CLASS,
            "measurements": {_QUPATH_NAMES[k]: v for k, v in _measurements(record, mpp).items()},
        },
    }


def write_nuclei(
    records: Iterable[dict], geojson_path: str | os.PathLike | None, csv_path: str | os.PathLike | None, mpp=None
) -> int:
    """Stream ``records`` into a GeoJSON FeatureCollection and/or a CSV (``CSV_COLUMNS``), both written
    under temporary names and renamed when complete; numbers the nuclei 1..N in that order; returns N."""
    count = 0
    optional = lambda path: atomic_path(path) if path else contextlib.nullcontext()  # noqa: E731
    with optional(geojson_path) as gj, optional(csv_path) as cv:
        gfile = open(gj, "w") if gj else None
        cfile = open(cv, "w", newline="") if cv else None
        try:
            writer = csv.writer(cfile) if cfile else None
            if gfile:
                gfile.write('{"type": "FeatureCollection", "features": [\n')
            if writer:
                writer.writerow(CSV_COLUMNS)
            for record in records:
                count += 1
                if gfile:
                    gfile.write((",\n" if count > 1 else "") + json.dumps({**geojson_feature(record, mpp), "id": str(count)}))
                if writer:
                    values = _measurements(record, mpp)
                    writer.writerow([count] + [values.get(k, "") for k in CSV_COLUMNS[1:]])
            if gfile:
                gfile.write("\n]}\n")
        finally:
            for f in (gfile, cfile):
                if f:
                    f.close()
    return count


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)

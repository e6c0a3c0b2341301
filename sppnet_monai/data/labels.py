"""Labels submitted by annotation clients -> instance maps, by the polygon rule of ``prepare monuseg``.

Three kinds of label file, told apart by their suffix:

- **ASAP XML** (``.xml``), what QuPath's *Submit Label* uploads::

      <ASAP_Annotations>
        <Annotations X="1024" Y="512" W="512" H="512">      # the patch in its slide; 0 0 0 0: the whole image
          <Annotation Name="nuclei" Type="Polygon"> <Coordinates>
            <Coordinate Order="0" X="12" Y="40"/> ...        # relative to the patch's X/Y

- **DSA annotation JSON** (``.json``): an annotation document (``{"elements": [...]}``, optionally under
  ``"annotation"``, or a list of them); ``polyline`` elements are outlines (``points`` ``[[x, y, z], ...]``),
  ``rectangle`` elements (``center``, ``width``, ``height``) their box; coordinates in image pixels.
- **PNG/TIFF masks**: an instance map, or a binary mask whose connected components are the nuclei
  (:func:`sppnet_monai.data.instances.instances_from_mask`).

Polygons become instances through :func:`sppnet_monai.data.monuseg.rasterise_regions`, the one rule of the
project (pixel centres inside by the half-open even-odd test, later outlines over earlier ones): outlines
drawn one by one are separate nuclei, touching or not. A label that cannot train anything raises
:class:`LabelError` naming the file and the reason: unreadable, no outline, every outline outside the
image, or a patch whose size is not its image's.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sppnet_monai.data import instances as inst
from sppnet_monai.data.image_io import read_mask
from sppnet_monai.data.monuseg import Region, rasterise_regions, to_float
from sppnet_monai.utils import SPPNetError

__all__ = [
    "LABEL_SUFFIXES",
    "LabelError",
    "PolygonLabel",
    "instances_to_asap_xml",
    "label_instances",
    "parse_asap_xml",
    "parse_dsa_json",
    "read_polygon_label",
]

POLYGON_SUFFIXES = (".xml", ".json")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
LABEL_SUFFIXES = POLYGON_SUFFIXES + MASK_SUFFIXES
# ASAP annotation types that are no closed outline (QuPath's ROI names; it skips points itself, other clients may not).
_NOT_OUTLINES = {"dot", "point", "points", "pointset", "line", "polyline", "spline"}


class LabelError(SPPNetError):
    """A label that cannot be used for training; the message names the file and the reason."""


@dataclass(frozen=True)
class PolygonLabel:
    """Nucleus outlines of one label file.

    ``regions``: outlines in the pixels of the labelled image (a patch's own pixels for a patch label).
    ``patch``: ``(x, y, w, h)`` of the patch in its slide (ASAP's ``Annotations`` attributes), or None when
    the label covers its image as a whole.
    """

    regions: list[Region]
    patch: tuple[int, int, int, int] | None = None

    def bounds(self) -> tuple[float, float, float, float]:
        """``(row_min, col_min, row_max, col_max)`` of all vertices."""
        rows = np.concatenate([r.rows for r in self.regions])
        cols = np.concatenate([r.cols for r in self.regions])
        return float(np.nanmin(rows)), float(np.nanmin(cols)), float(np.nanmax(rows)), float(np.nanmax(cols))

    def box(self, margin: int = 0, size: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of whole pixels holding every vertex, grown by ``margin``, clipped to ``size`` ``(W, H)``."""
        row0, col0, row1, col1 = self.bounds()
        x0, y0 = int(np.floor(col0)) - margin, int(np.floor(row0)) - margin
        x1, y1 = int(np.ceil(col1)) + margin + 1, int(np.ceil(row1)) + margin + 1
        if size is not None:
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(size[0], x1), min(size[1], y1)
        return x0, y0, x1 - x0, y1 - y0

    def shifted(self, row: float, col: float) -> "PolygonLabel":
        """The same outlines with ``(row, col)`` subtracted from every vertex (the label of a crop)."""
        return PolygonLabel([Region(r.region_id, r.rows - row, r.cols - col) for r in self.regions], self.patch)


def _number(text: str | None, what: str, name: str) -> float:
    """``text`` as a finite number; LabelError naming ``what`` otherwise (``inf``/``nan`` included)."""
    value = to_float(text)  # nan for what is not a number
    if not np.isfinite(value):
        raise LabelError(f"{name}: {what} is {text!r}, not a finite number")
    return value


def parse_asap_xml(data: bytes | str, name: str = "label") -> PolygonLabel:
    """The outlines of an ASAP XML document (QuPath's *Submit Label*), vertices relative to its patch.

    Raises:
        LabelError: not XML, no ``Annotation`` with 3 or more coordinates, or a non-numeric coordinate.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise LabelError(f"{name}: not valid ASAP XML ({err})") from None
    box = root.find("Annotations") if root.tag != "Annotations" else root
    patch = None
    if box is not None:
        x, y, w, h = (int(_number(box.get(key, "0"), f"Annotations {key}", name)) for key in "XYWH")
        if w < 0 or h < 0:
            raise LabelError(f"{name}: the patch size W x H is {w} x {h}")
        patch = (x, y, w, h) if w > 0 and h > 0 else None
    regions = []
    for index, annotation in enumerate(root.iter("Annotation")):
        if str(annotation.get("Type", "")).lower() in _NOT_OUTLINES:
            continue
        coordinates = sorted(annotation.iter("Coordinate"), key=lambda c: _number(c.get("Order", "0"), "a Coordinate Order", name))
        if len(coordinates) < 3:
            continue
        cols = np.array([_number(c.get("X"), f"Annotation #{index} X", name) for c in coordinates])
        rows = np.array([_number(c.get("Y"), f"Annotation #{index} Y", name) for c in coordinates])
        regions.append(Region(annotation.get("Name") or f"#{index}", rows, cols))
    if not regions:
        raise LabelError(f"{name}: no nucleus outline (an ASAP Annotation with 3 or more Coordinates)")
    return PolygonLabel(regions, patch)


def instances_to_asap_xml(instances: np.ndarray, x: int = 0, y: int = 0) -> str:
    """An ``(H, W)`` instance map of the patch at ``(x, y)`` as QuPath's *Submit Label* writes it: one polygon per
    nucleus (its contour, :func:`sppnet_monai.nuclei.nuclei_records`), vertices relative to the patch."""
    from sppnet_monai.nuclei import nuclei_records

    root = ET.Element("ASAP_Annotations")
    height, width = instances.shape
    box = ET.SubElement(root, "Annotations", Name="", Description="", X=str(x), Y=str(y), W=str(width), H=str(height))
    for record in nuclei_records(instances):
        annotation = ET.SubElement(box, "Annotation", Name="Nucleus", Type="Polygon", PartOfGroup="Nucleus")
        coordinates = ET.SubElement(annotation, "Coordinates")
        for order, (px, py) in enumerate(record["contour"]):
            ET.SubElement(coordinates, "Coordinate", Order=str(order), X=f"{px:g}", Y=f"{py:g}")
    ET.SubElement(root, "AnnotationGroups")
    return ET.tostring(root, encoding="unicode")


def _dsa_elements(document: Any, name: str) -> list[dict]:
    """The elements of a DSA annotation document, a ``{"annotation": ...}`` wrapper or a list of either."""
    if isinstance(document, list):
        return [element for doc in document for element in _dsa_elements(doc, name)]
    if isinstance(document, dict):
        document = document.get("annotation", document)
        elements = document.get("elements") if isinstance(document, dict) else None
        if isinstance(elements, list):
            return [e for e in elements if isinstance(e, dict)]
    raise LabelError(f"{name}: not a DSA annotation document (no 'elements' list)")


def _dsa_outline(element: dict, index: int, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, cols)`` of a ``polyline`` or ``rectangle`` element; None for other kinds (points, text)."""
    kind = element.get("type")
    try:
        if kind == "polyline" and element.get("closed", True):
            points = np.asarray(element.get("points", []), dtype=np.float64)
            if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] < 2:
                return None
            rows, cols = points[:, 1], points[:, 0]
        elif kind == "rectangle":
            (cx, cy, *_), w, h = element["center"], float(element["width"]), float(element["height"])
            dx, dy = np.array([-w, w, w, -w]) / 2, np.array([-h, -h, h, h]) / 2
            angle = float(element.get("rotation", 0.0))  # radians, about the centre
            cols = cx + dx * np.cos(angle) - dy * np.sin(angle)
            rows = cy + dx * np.sin(angle) + dy * np.cos(angle)
        else:
            return None
    except (KeyError, TypeError, ValueError) as err:
        raise LabelError(f"{name}: element #{index} ({kind}) has malformed coordinates ({err})") from None
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        raise LabelError(f"{name}: element #{index} ({kind}) has a coordinate that is not a finite number")
    return np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)


def parse_dsa_json(data: bytes | str, name: str = "label") -> PolygonLabel:
    """The outlines of a DSA annotation document (image pixels, the whole image).

    Raises:
        LabelError: not JSON, not an annotation document, or no closed outline in it.
    """
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelError(f"{name}: not valid JSON ({err})") from None
    regions = []
    for index, element in enumerate(_dsa_elements(document, name)):
        outline = _dsa_outline(element, index, name)
        if outline is not None:
            regions.append(Region(str(element.get("id", f"#{index}")), *outline))
    if not regions:
        raise LabelError(f"{name}: no nucleus outline (a DSA polyline with 3 or more points, or a rectangle)")
    return PolygonLabel(regions)


def read_polygon_label(path: str | os.PathLike, name: str | None = None) -> PolygonLabel:
    """The outlines of an ASAP XML or DSA JSON label file, by its suffix."""
    path = Path(path)
    name = name or path.name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LabelError(f"{name}: cannot be read ({err.strerror or err})") from None
    if path.suffix.lower() == ".xml":
        return parse_asap_xml(data, name)
    if path.suffix.lower() == ".json":
        return parse_dsa_json(data, name)
    raise LabelError(f"{name}: not a polygon label (expected one of {POLYGON_SUFFIXES})")


def polygon_instances(label: PolygonLabel, shape: tuple[int, int], name: str = "label") -> np.ndarray:
    """``(H, W)`` uint16 instance map of ``label``'s outlines on an image of ``shape`` (the one polygon rule).

    Raises:
        LabelError: the label's patch size is not ``shape``, or no outline covers a pixel of the image.
    """
    height, width = shape
    if label.patch is not None and (label.patch[3], label.patch[2]) != (height, width):
        raise LabelError(
            f"{name}: the label's patch is {label.patch[2]}x{label.patch[3]} (Annotations W x H) but its image is {width}x{height}"
        )
    outside = [r.region_id for r in label.regions if _disjoint(r, height, width)]
    if outside:
        row0, col0, row1, col1 = label.bounds()
        raise LabelError(
            f"{name}: {len(outside)} of {len(label.regions)} outlines lie outside the {width}x{height} image "
            f"(outlines span x {col0:g}..{col1:g}, y {row0:g}..{row1:g}; vertices are relative to the patch's X/Y)"
        )
    labels, _ = rasterise_regions(label.regions, (height, width))
    if inst.count_instances(labels) == 0:
        raise LabelError(f"{name}: no outline covers a pixel centre of the {width}x{height} image")
    return labels


def _disjoint(region: Region, height: int, width: int) -> bool:
    """Does ``region``'s bounding box miss the image area ``[-0.5, H - 0.5] x [-0.5, W - 0.5]`` entirely?"""
    with np.errstate(invalid="ignore"):
        return bool(
            np.nanmax(region.rows) < -0.5 or np.nanmin(region.rows) > height - 0.5
            or np.nanmax(region.cols) < -0.5 or np.nanmin(region.cols) > width - 0.5
        )


def label_instances(label_path: str | os.PathLike, shape: tuple[int, int], name: str | None = None) -> tuple[np.ndarray, str]:
    """A label file of an image of ``shape`` -> (``(H, W)`` uint16 instance map, how it was obtained).

    ``name`` (default: the file's name) is what messages call the label, e.g. the datastore's image id, so
    that a server's answer does not show its paths.

    Raises:
        LabelError: naming ``name`` and the reason.
    """
    label_path = Path(label_path)
    name = name or label_path.name
    suffix = label_path.suffix.lower()
    if suffix in POLYGON_SUFFIXES:
        return polygon_instances(read_polygon_label(label_path, name), shape, name), inst.FROM_XML
    if suffix not in MASK_SUFFIXES:
        raise LabelError(f"{name}: a label must be one of {LABEL_SUFFIXES}, got {suffix or 'no suffix'!r}")
    try:
        labels, how = inst.instances_from_mask(read_mask(label_path))
    except SPPNetError as err:  # read_mask names the file itself
        raise LabelError(str(err).replace(str(label_path), name)) from None
    except (ValueError, OSError) as err:
        raise LabelError(f"{name}: {err}") from None
    if labels.shape != tuple(shape):  # rows x columns, as numpy and the preparations say it
        raise LabelError(f"{name}: mask is {labels.shape[0]}x{labels.shape[1]} but its image is {shape[0]}x{shape[1]}")
    if inst.count_instances(labels) == 0:
        raise LabelError(f"{name}: the mask holds no nucleus")
    return labels, how

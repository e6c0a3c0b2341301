"""MONAI Label active learning for QuPath's *Next Sample*: the next tissue patch to label, never one labelled.

QuPath posts ``/activelearning/{strategy}`` with ``{"image": <image id or "">, "patch_size": [w, h],
"image_size": [W, H]}`` and draws the answer's ``bbox`` ``[x, y, w, h]`` (level-0 pixels) as the rectangle
to annotate. Both strategies answer ``{"id", "bbox", "candidates"}``:

- ``random``: a random unlabelled tissue cell of the patch grid (:mod:`sppnet_monai.active_learning`);
- ``entropy``: of up to :data:`MAX_SCORED` such cells, the one where the served model is least sure (mean
  pixel entropy of its nuclei probability over a window at the cell's centre).

Without an image (QuPath's "Next Patch" unticked) the image is chosen first: an image with no final label
(random, or the least sure by the same score at its centre). A labelled area is the patch of a final label
(QuPath uploads a patch as ``<image>-patch-<x>_<y>_<w>_<h>``), or its outlines' box for a whole-slide label.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.strategy import Strategy

from lib.engine import ClickSegmenter
from sppnet_monai.active_learning import Box, candidate_patches, centre_window, least_sure, tissue_mask
from sppnet_monai.data.labels import POLYGON_SUFFIXES, LabelError, read_polygon_label
from sppnet_monai.data.slides import Slide
from sppnet_monai.utils import SPPNetError, without_folders

logger = logging.getLogger(__name__)

DEFAULT_PATCH_SIZE = (1024, 1024)  # QuPath's default
MAX_SCORED = 16
# Longest side of the tissue map read from a slide (its lowest level at or above this size).
TISSUE_MAP_SIDE = 2048
PATCH_NAME = re.compile(r"^(?P<image>.+)-patch-(?P<x>\d+)_(?P<y>\d+)_(?P<w>\d+)_(?P<h>\d+)$")


def _patch_size(request: Dict[str, Any]) -> tuple[int, int]:
    value = request.get("patch_size") or DEFAULT_PATCH_SIZE
    try:
        w, h = (int(v) for v in value)
    except (TypeError, ValueError):
        raise HTTPException(status_code=400, detail=f"patch_size must be [width, height], got {value!r}") from None
    if w <= 0 or h <= 0:
        raise HTTPException(status_code=400, detail=f"patch_size must be positive, got {[w, h]}")
    return w, h


def labelled_boxes(datastore: Datastore, image: str) -> list[Box]:
    """The level-0 boxes of ``image`` that have a final label (its own label, and QuPath's patches of it)."""
    boxes: list[Box] = []
    for other in datastore.list_images():
        match = PATCH_NAME.match(other)
        own = other == image
        if not (own or (match and match["image"] == image)):
            continue
        label_id = datastore.get_labels_by_image_id(other).get(DefaultLabelTag.FINAL.value)
        if not label_id:
            continue
        if match:
            boxes.append(tuple(int(match[k]) for k in "xywh"))  # type: ignore[arg-type]
            continue
        path = Path(datastore.get_label_uri(label_id, DefaultLabelTag.FINAL.value))
        if path.suffix.lower() not in POLYGON_SUFFIXES:
            return [(0, 0, 1 << 30, 1 << 30)]  # a mask labels the whole image
        try:
            label = read_polygon_label(path, name=image)
        except LabelError:
            continue
        boxes.append(label.patch if label.patch is not None else label.box())
    return boxes


def tissue_share_of(slide: Slide):
    """``share(box)``: the tissue share of a level-0 box, from one tissue map of the slide read at a low level."""
    target = min(TISSUE_MAP_SIDE, max(slide.size(0)))
    level = max(lv for lv in range(slide.level_count) if max(slide.size(lv)) >= target)
    width, height = slide.size(level)
    tissue = tissue_mask(slide.read(0, 0, width, height, level))
    scale = slide.downsample(level)

    def share(box: Box) -> float:
        x0, y0 = int(box[0] / scale), int(box[1] / scale)
        x1, y1 = max(x0 + 1, int(np.ceil((box[0] + box[2]) / scale))), max(y0 + 1, int(np.ceil((box[1] + box[3]) / scale)))
        cell = tissue[y0:y1, x0:x1]
        return float(cell.mean()) if cell.size else 0.0

    return share


class NextPatch(Strategy):
    """The next unlabelled tissue patch, chosen at random (``uncertainty=False``) or where the model is least sure."""

    def __init__(self, segmenter: ClickSegmenter, uncertainty: bool, seed: int | None = None) -> None:
        super().__init__(
            "Tissue patch where the served model is least sure (mean pixel entropy)"
            if uncertainty else "Random unlabelled tissue patch"
        )
        self.segmenter = segmenter
        self.uncertainty = uncertainty
        self.rng = np.random.default_rng(seed)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        try:
            return self._choose(request, datastore)
        except SPPNetError as err:  # an unreadable image, no model to score with: the user's to fix
            raise HTTPException(status_code=400, detail=without_folders(str(err), datastore.get_image_uri(str(request.get("image") or "")) or "")) from None

    def _choose(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        patch_size = _patch_size(request)
        image = request.get("image") or self._next_image(datastore)
        path = datastore.get_image_uri(image) if isinstance(image, str) else ""
        if not path or not Path(path).is_file():
            raise HTTPException(status_code=404, detail=f"unknown image id {image!r}: GET /datastore/?output=all lists the ids.")
        with Slide(path) as slide:
            size = slide.size()
            candidates = candidate_patches(size, patch_size, tissue_share_of(slide), labelled_boxes(datastore, image))
        if not candidates:
            raise HTTPException(status_code=404, detail=f"{image}: no unlabelled tissue patch of {patch_size[0]}x{patch_size[1]} is left.")
        order = self.rng.permutation(len(candidates))
        candidates = [candidates[i] for i in order]
        if self.uncertainty:
            scored = candidates[:MAX_SCORED]
            bbox, scores = least_sure(scored, lambda box: self._entropy(path, box, size))
            logger.info("%s: %d candidates, entropy %s", image, len(scored), [round(s, 4) for s in scores])
        else:
            bbox = candidates[0]
        return {"id": image, "bbox": [int(v) for v in bbox], "candidates": len(candidates)}

    def _entropy(self, path: str, box: Box, size: Sequence[int]) -> float:
        return self.segmenter.window_entropy(path, centre_window(box, self.segmenter.image_size, tuple(size)))

    def _next_image(self, datastore: Datastore) -> str:
        """An image with no final label that is not a patch upload: random, or the least sure at its centre."""
        images = [i for i in datastore.get_unlabeled_images() if not PATCH_NAME.match(i)]
        if not images:
            raise HTTPException(status_code=404, detail="every image of the datastore has a final label.")
        images = [images[i] for i in self.rng.permutation(len(images))[:MAX_SCORED]]
        if not self.uncertainty:
            return images[0]

        def centre_entropy(image: str) -> float:
            path = datastore.get_image_uri(image)
            with Slide(path) as slide:
                size = slide.size()
            return self.segmenter.window_entropy(path, centre_window((0, 0, *size), self.segmenter.image_size, size))

        image, _ = least_sure(images, centre_entropy)
        return image

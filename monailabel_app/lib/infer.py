"""MONAI Label infer task: one request = the clicks of one image, answered from the cached embedding."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from lib.engine import ClickSegmenter, ImageNotFoundError, RegionCancelled, parse_clicks
from sppnet_monai.clicks import click_pixels
from sppnet_monai.nuclei import NUCLEUS_CLASS, nuclei_records
from sppnet_monai.utils import SPPNetError, without_folders

logger = logging.getLogger(__name__)

LABEL_NAMES = {"nuclei": 1}
# Keys MONAI Label's WSI protocol puts in each tile's request (``create_infer_wsi_tasks``).
WSI_KEYS = ("location", "size", "tile_size")
# A WSI request's region and tiling keys with MONAI Label's defaults (``create_infer_wsi_tasks``).
WSI_TILING = (("location", (0, 0)), ("size", (0, 0)), ("tile_size", (2048, 2048)))
# Request key: the engine's cancel count when a WSI request began (every tile MONAI Label cuts from it carries it).
CANCEL_COUNT = "sppnet_cancel_count"
# The 400 for a WSI request that names no slide (checked by the route and again by the app).
NO_SLIDE = "give the slide: ?image=<datastore id> (or upload it as 'file' to /infer/wsi_v2)."


def is_wsi_request(request: Dict[str, Any]) -> bool:
    """A tile of MONAI Label's ``/infer/wsi`` (QuPath, DSA) rather than the app's own click request."""
    return any(key in request for key in WSI_KEYS)


def read_level(request: Dict[str, Any]) -> int:
    level = request.get("level", 0)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise SPPNetError(f"level must be a non-negative integer, got {level!r}.")
    return level


def read_pair(request: Dict[str, Any], key: str, default=(0, 0)) -> list[int]:
    """``request[key]`` as two non-negative integers below 2**31 (``location``, ``size``, ``tile_size``)."""
    value = request.get(key, default)
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in value)
    ):
        raise SPPNetError(f"{key} must be two integers from 0 to 2**31 - 1 (pixels), got {value!r}.")
    return list(value)


@functools.lru_cache(maxsize=16)
def slide_geometry(path: str, stamp: tuple[int, int]):
    """A closed :class:`~sppnet_monai.data.slides.Slide` of ``path`` as it was at ``stamp`` (mtime, size): its levels and
    sizes, to check requests without opening the file for each click (an OpenSlide open costs ~15 ms)."""
    from sppnet_monai.data.slides import Slide

    slide = Slide(path)
    slide.close()
    return slide


def check_wsi_request(request: Dict[str, Any], path: str) -> tuple[list[int], list[int]]:
    """The region ``[x, y, w, h]`` (a zero size: the whole slide) and ``tile_size`` ``[w, h]`` of a WSI request
    (MONAI Label's defaults, :data:`WSI_TILING`). Raise :class:`SPPNetError` with the reason when it cannot be
    served: a slide that cannot be read, a level it does not have, a region outside it, a tile_size out of
    range, a click outside the region."""
    from sppnet_monai.slide_inference import check_tile_size

    level = read_level(request)
    (x, y), (w, h), tile_size = (read_pair(request, key, default) for key, default in WSI_TILING)
    for side in tile_size:
        check_tile_size(side)
    stat = os.stat(path)
    slide = slide_geometry(path, (stat.st_mtime_ns, stat.st_size))
    slide.check_level(level)
    region = (x, y, w, h) if w and h else (0, 0, *slide.size(0))
    slide.check_region(region)
    for name in ("foreground", "background"):
        click_pixels(parse_clicks(request.get(name), name), region[2], region[3], name, "the region", origin=region[:2])
    return [x, y, w, h], tile_size


class SPPNetClickInfer(InferTask):
    """Interactive SPPNet: ``foreground`` / ``background`` clicks (lists of ``[x, y]``) in the params.

    Request params (besides MONAI Label's own ``image``, ``output``, ...):

    - ``foreground``: ``[[x, y], ...]``, at least one click on a nucleus (x = column, y = row).
    - ``background``: ``[[x, y], ...]``, optional; without one in a click's window, one is chosen
      automatically (see :mod:`lib.engine`).
    - ``label_type``: ``"mask"`` (default: uint8 PNG, 1 = nucleus) or ``"instances"`` (uint16 PNG,
      one id per nucleus).
    - ``contours``: ``true`` (default) to list every nucleus contour in the result JSON.

    With ``nuclick`` (the click tool's model) and a network with a click head, the answer is the clicked
    nuclei alone, so that clicking one nucleus after another adds one polygon each; the other model answers
    every nucleus of the clicks' windows, corrected by the clicks (positive adds a missed nucleus,
    negative removes a false one).

    The result JSON holds ``nuclei`` (id, area, centroid, contour as ``[[x, y], ...]``),
    ``nuclei_count``, ``windows`` (the processed window of each click, the prompt used and whether
    its embedding came from the cache), ``encoder_runs`` (encoder calls since the server started)
    and ``latencies``.
    """

    def __init__(
        self, segmenter: ClickSegmenter, description: str = "SPPNet single-point prompt nuclei segmentation", nuclick: bool = False
    ):
        self.nuclick = nuclick
        super().__init__(
            type=InferType.DEEPGROW,
            labels=LABEL_NAMES,
            dimension=2,
            description=description,
            config={"label_type": "mask", "contours": True},
        )
        self.segmenter = segmenter

    def is_valid(self) -> bool:
        return self.segmenter.config.is_file()

    def get_path(self, validate=True):
        return str(self.segmenter.checkpoint)

    def info(self) -> Dict[str, Any]:
        # The QuPath extension reads these: pathology models get its WSI commands; a "nuclick" model
        # serves its click tool (every point is a positive click), any other its rectangle command
        # (zero clicks allowed, "Positive"/"Negative" points).
        return {**super().info(), "pathology": True, "nuclick": self.nuclick}

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        if is_wsi_request(request):
            return None, self.infer_tile(request)
        start = time.perf_counter()
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.isfile(image):
            raise HTTPException(status_code=404, detail=f"image {os.path.basename(str(image or ''))!r} not found in the datastore.")
        try:
            foreground = parse_clicks(request.get("foreground"), "foreground")
            background = parse_clicks(request.get("background"), "background")
            label_type = str(request.get("label_type", "mask"))
            if label_type not in ("mask", "instances"):
                raise SPPNetError(f"label_type must be 'mask' or 'instances', got {label_type!r}.")
            mask, instances, info = self.segmenter.segment(image, foreground, background, clicked_only=self.nuclick)
        except ImageNotFoundError as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        except SPPNetError as err:  # the user's request: answered, never a 500, without the server's folders
            raise HTTPException(status_code=400, detail=without_folders(str(err), image)) from err
        infer_time = time.perf_counter() - start

        array = mask if label_type == "mask" else instances.astype(np.uint16)
        fd, label_file = tempfile.mkstemp(suffix=".png", prefix="sppnet_")
        os.close(fd)
        Image.fromarray(array).save(label_file, format="PNG")
        result = {"label_names": LABEL_NAMES, "label_type": label_type, **info}
        if str(request.get("contours", True)).lower() not in ("false", "0", "no"):
            x, y, w, h = info["changed"]  # contours of what the clicks changed only
            result["nuclei"] = nuclei_records(instances[y : y + h, x : x + w], origin=(x, y))
        result["latencies"] = {"infer": round(infer_time, 4), "total": round(time.perf_counter() - start, 4)}
        logger.info(
            "SPPNet: %d click(s) -> %d nuclei; encoder runs %d; %.3fs",
            len(foreground), info["nuclei_count"], info["encoder_runs"], infer_time,
        )
        return label_file, result

    def infer_tile(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """One tile of MONAI Label's WSI protocol: its nuclei as the ``annotation`` its ASAP / DSA writers read.

        ``location`` / ``size`` (level-0 slide pixels; size 0: the whole image), ``level``, ``min_poly_area``
        and ``foreground`` / ``background`` clicks in level-0 slide pixels (another tile's clicks are ignored).
        """
        start = time.perf_counter()
        image = request.get("image")
        try:
            if not isinstance(image, str) or not os.path.isfile(image):
                raise ImageNotFoundError(f"image {os.path.basename(str(image or ''))!r} not found in the datastore.")
            x, y = read_pair(request, "location")
            w, h = read_pair(request, "size")
            records, info = self.segmenter.segment_region(
                image,
                (x, y, w, h),
                read_level(request),
                parse_clicks(request.get("foreground"), "foreground"),
                parse_clicks(request.get("background"), "background"),
                min_area=float(request.get("min_poly_area") or 0),
                clicked_only=self.nuclick,
                cancel_count=request.get(CANCEL_COUNT),
            )
        except ImageNotFoundError as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        except RegionCancelled as err:
            raise HTTPException(status_code=409, detail=str(err)) from err
        except SPPNetError as err:
            raise HTTPException(status_code=400, detail=without_folders(str(err), str(image))) from err
        infer = time.perf_counter() - start
        label = NUCLEUS_CLASS["name"]
        annotation = {
            "labels": {label: NUCLEUS_CLASS["color"]},
            "elements": [{"label": label, "contours": [r["contour"] for r in records]}] if records else [],
        }
        total = time.perf_counter() - start
        # infer_wsi sums pre / infer / post / total over the tiles: reading is inside infer here.
        latencies = {"pre": 0.0, "infer": round(infer, 4), "post": round(total - infer, 4), "total": round(total, 4)}
        logger.info("SPPNet tile %s: %d nuclei (%s); %.3fs", request.get("location"), len(records), info["mode"], total)
        return {"annotation": annotation, "nuclei": records, **info, "latencies": latencies}

"""MONAI Label infer task: one request = the clicks of one image, answered from the cached embedding."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, Tuple, Union

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from lib.engine import ClickSegmenter, ImageNotFoundError, nuclei_contours, parse_clicks
from sppnet_monai.utils import SPPNetError

logger = logging.getLogger(__name__)

LABEL_NAMES = {"nuclei": 1}


class SPPNetClickInfer(InferTask):
    """Interactive SPPNet: ``foreground`` / ``background`` clicks (lists of ``[x, y]``) in the params.

    Request params (besides MONAI Label's own ``image``, ``output``, ...):

    - ``foreground``: ``[[x, y], ...]``, at least one click on a nucleus (x = column, y = row).
    - ``background``: ``[[x, y], ...]``, optional; without one in a click's window, one is chosen
      automatically (see :mod:`lib.engine`).
    - ``label_type``: ``"mask"`` (default: uint8 PNG, 1 = nucleus) or ``"instances"`` (uint16 PNG,
      one id per nucleus).
    - ``contours``: ``true`` (default) to list every nucleus contour in the result JSON.

    The result JSON holds ``nuclei`` (id, area, centroid, contour as ``[[x, y], ...]``),
    ``nuclei_count``, ``windows`` (the processed window of each click, the prompt used and whether
    its embedding came from the cache), ``encoder_runs`` (encoder calls since the server started)
    and ``latencies``.
    """

    def __init__(self, segmenter: ClickSegmenter, description: str = "SPPNet single-point prompt nuclei segmentation"):
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

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        start = time.perf_counter()
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.isfile(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore.")
        try:
            foreground = parse_clicks(request.get("foreground"), "foreground")
            background = parse_clicks(request.get("background"), "background")
            label_type = str(request.get("label_type", "mask"))
            if label_type not in ("mask", "instances"):
                raise SPPNetError(f"label_type must be 'mask' or 'instances', got {label_type!r}.")
            mask, instances, info = self.segmenter.segment(image, foreground, background)
        except ImageNotFoundError as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        except SPPNetError as err:  # the user's request: answered, never a 500
            raise HTTPException(status_code=400, detail=str(err)) from err
        infer_time = time.perf_counter() - start

        array = mask if label_type == "mask" else instances.astype(np.uint16)
        fd, label_file = tempfile.mkstemp(suffix=".png", prefix="sppnet_")
        os.close(fd)
        Image.fromarray(array).save(label_file, format="PNG")
        result = {"label_names": LABEL_NAMES, "label_type": label_type, **info}
        if str(request.get("contours", True)).lower() not in ("false", "0", "no"):
            result["nuclei"] = nuclei_contours(instances)
        result["latencies"] = {"infer": round(infer_time, 4), "total": round(time.perf_counter() - start, 4)}
        logger.info(
            "SPPNet: %d click(s) -> %d nuclei; encoder runs %d; %.3fs",
            len(foreground), info["nuclei_count"], info["encoder_runs"], infer_time,
        )
        return label_file, result

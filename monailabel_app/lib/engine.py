"""Click-driven SPPNet inference with a per-image embedding cache (no MONAI Label import here).

The server-independent part of the app, so that it can be used and tested on its own:

- **Window.** SPPNet sees ``image_size x image_size`` pixels. An image that fits is processed
  whole (padded by the network). A larger image is never resized: each foreground click is served
  by the window of ``image_size`` containing it whose origin lies on a grid of stride
  ``image_size / 2`` (plus the last window flush with the right/bottom border) and whose centre is
  nearest the click, so the click is at least ``image_size / 4`` from the window's edge (except
  at the image border) and nearby clicks share a window, hence an embedding.
- **Prompts.** Each foreground click is one positive point; the negative point is the first
  ``background`` click that falls in the same window; if there is none, it is chosen
  automatically in that window by :func:`sppnet_monai.transforms.choose_clicks` (the bundle's
  ``AutoClickd`` rule): the background pixel farthest from any nucleus-like blob of the Otsu
  threshold of the hematoxylin channel (and from the window border). A window with no such
  background gets no negative point.
- **Cache.** ``SPPNet.encode`` output of each window is kept in an LRU dictionary keyed by
  ``(image path, file mtime, file size, window)``, so a second click in the same window skips the
  encoder; :attr:`ClickSegmenter.encoder_runs` counts encoder calls. The cache is emptied when the
  checkpoint file changes (it is reloaded, e.g. after ``/train``).
- **Output.** The union of the windows' masks (thresholded sigmoid) in a full-size ``(H, W)``
  mask, split into nuclei by :func:`sppnet_monai.postprocess.instances_from_semantic` with the
  bundle's ``instance_postprocess`` parameters.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["ClickError", "ClickSegmenter", "choose_window", "parse_clicks"]


class ClickError(ValueError):
    """A request the user must fix (bad clicks, unreadable image, no model): answered with HTTP 4xx."""


def parse_clicks(value: Any, name: str) -> list[list[int]]:
    """``[[x, y], ...]`` of ints from request params (a list, or a JSON string of one); raise ClickError."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ClickError(f"'{name}' must be a list of [x, y] pairs, got the string {value[:80]!r}.") from err
    if not isinstance(value, (list, tuple)):
        raise ClickError(f"'{name}' must be a list of [x, y] pairs, got {type(value).__name__}.")
    clicks = []
    for point in value:
        if (
            not isinstance(point, (list, tuple))
            or len(point) < 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in point[:2])
        ):
            raise ClickError(f"'{name}' must be a list of [x, y] pairs of numbers, got the element {point!r}.")
        clicks.append([int(round(point[0])), int(round(point[1]))])  # a 3rd value (slice index) is ignored
    return clicks


def _window_origin(click: int, length: int, size: int) -> int:
    if length <= size:
        return 0
    origins = list(range(0, length - size, size // 2)) + [length - size]
    return min(origins, key=lambda o: abs(o + size / 2 - click))


def choose_window(x: int, y: int, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` of the window of side ``size`` serving a click at ``(x, y)`` (see module doc)."""
    x0, y0 = _window_origin(x, width, size), _window_origin(y, height, size)
    return x0, y0, min(size, width), min(size, height)


def _contour(region_mask: np.ndarray, x0: int, y0: int) -> list[list[float]]:
    """The longest outer contour of one nucleus, ``[[x, y], ...]`` in image pixels."""
    from skimage import measure

    contours = measure.find_contours(np.pad(region_mask, 1).astype(np.uint8), 0.5)
    if not contours:
        return []
    longest = measure.approximate_polygon(max(contours, key=len), tolerance=0.5)  # pixel-edge polygon, simplified
    return [[round(float(c) - 1 + x0, 1), round(float(r) - 1 + y0, 1)] for r, c in longest]


def nuclei_contours(instances: np.ndarray) -> list[dict]:
    """One ``{"id", "area", "centroid", "contour"}`` per instance label of ``instances``."""
    from skimage import measure

    nuclei = []
    for region in measure.regionprops(instances):
        r0, c0, _, _ = region.bbox
        cy, cx = region.centroid
        nuclei.append(
            {
                "id": int(region.label),
                "area": int(region.area),
                "centroid": [round(float(cx), 1), round(float(cy), 1)],
                "contour": _contour(region.image, c0, r0),
            }
        )
    return nuclei


class ClickSegmenter:
    """A trained SPPNet bundle served click by click.

    Args:
        bundle_dir: a MONAI bundle folder with ``configs/inference.json`` and ``models/model.pt``.
        cache_size: how many window embeddings to keep (each ~12 MB at image_size 1024).
        overrides: ids of ``inference.json`` to override (e.g. ``image_size=256``, ``threshold=0.4``).
    """

    def __init__(self, bundle_dir: str | os.PathLike, cache_size: int = 8, **overrides: Any) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.config = self.bundle_dir / "configs" / "inference.json"
        self.checkpoint = self.bundle_dir / "models" / "model.pt"
        self.cache_size = max(0, int(cache_size))
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.encoder_runs = 0
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._predictor = None
        self._model_stamp: tuple | None = None
        self._lock = threading.RLock()

    # -- model -------------------------------------------------------------------------------
    def _model(self):
        from sppnet_monai.predict import Predictor

        if not self.config.is_file():
            raise ClickError(f"no bundle inference config at {self.config}.")
        if not self.checkpoint.is_file():
            raise ClickError(f"no trained model at {self.checkpoint}: train one (POST /train) or copy model.pt there.")
        stat = self.checkpoint.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._predictor is None or stamp != self._model_stamp:
            logger.info("loading SPPNet from %s", self.checkpoint)
            self._predictor = Predictor(str(self.checkpoint), self.config, **self.overrides)
            self._model_stamp = stamp
            self._cache.clear()
        return self._predictor

    @property
    def image_size(self) -> int:
        return int(self._model().network.image_size)

    # -- embedding cache ---------------------------------------------------------------------
    def _window_entry(self, path: Path, stamp: tuple, window: tuple, predictor) -> tuple[dict, bool]:
        key = (str(path), *stamp, window)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry, True
        from sppnet_monai.data.image_io import read_rgb
        from sppnet_monai.utils import SPPNetError

        x0, y0, w, h = window
        try:  # the project's RGB conversion (alpha over white, 16-bit scaled), as prepare and the bundle do
            rgb = read_rgb(path)[y0 : y0 + h, x0 : x0 + w].astype(np.float32)  # (h, w, 3)
        except SPPNetError as err:
            raise ClickError(str(err)) from err
        chw = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
        mean = np.asarray(predictor.pixel_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(predictor.pixel_std, dtype=np.float32)[:, None, None]
        tensor = torch.from_numpy((chw - mean) / std)[None].to(predictor.device)
        with torch.no_grad():
            features = predictor.network.encode(tensor)
        self.encoder_runs += 1
        entry = {"features": features, "rgb": chw, "auto_background": None}
        if self.cache_size:
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry, False

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- inference ---------------------------------------------------------------------------
    def segment(
        self, image_path: str | os.PathLike, foreground: Sequence[Sequence[int]], background: Sequence[Sequence[int]] = ()
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Nuclei mask ``(H, W)`` uint8 0/1, instance map ``(H, W)`` int32 and a JSON-able summary."""
        from sppnet_monai.postprocess import instances_from_semantic
        from sppnet_monai.transforms import choose_clicks

        path = Path(image_path)
        try:
            stat = path.stat()
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, Image.DecompressionBombError) as err:
            raise ClickError(f"cannot read image {path.name}: {err}") from err
        foreground = [list(p) for p in foreground]
        background = [list(p) for p in background]
        if not foreground:
            raise ClickError("give at least one foreground click: params {\"foreground\": [[x, y]]}.")
        for name, clicks in (("foreground", foreground), ("background", background)):
            for x, y in clicks:
                if not (0 <= x < width and 0 <= y < height):
                    raise ClickError(f"{name} click [{x}, {y}] lies outside the {width}x{height} (WxH) image.")

        with self._lock:
            predictor = self._model()
            size = int(predictor.network.image_size)
            stamp = (stat.st_mtime_ns, stat.st_size)
            mask = np.zeros((height, width), dtype=bool)
            windows: dict[tuple, list] = {}
            for x, y in foreground:
                windows.setdefault(choose_window(x, y, width, height, size), []).append([x, y])
            summary = []
            for window, clicks in windows.items():
                x0, y0, w, h = window
                entry, hit = self._window_entry(path, stamp, window, predictor)
                inside = [[x - x0, y - y0] for x, y in background if x0 <= x < x0 + w and y0 <= y < y0 + h]
                auto = not inside
                if auto:
                    if entry["auto_background"] is None:
                        entry["auto_background"] = choose_clicks(entry["rgb"])[1]
                    inside = entry["auto_background"]
                negative, negative_label = (inside[0], 0) if inside else ([0, 0], -1)
                coords = torch.tensor([[[x - x0, y - y0], negative] for x, y in clicks], dtype=torch.float32)
                labels = torch.tensor([[1, negative_label]] * len(clicks))
                with torch.no_grad():
                    out = predictor.network.decode(entry["features"], coords.to(predictor.device), labels.to(predictor.device))
                probs = torch.sigmoid(out.masks[:, 0].float()).amax(dim=0).cpu().numpy()
                mask[y0 : y0 + h, x0 : x0 + w] |= probs > predictor.threshold
                summary.append(
                    {
                        "window": [x0, y0, w, h],
                        "foreground": clicks,
                        "background": [[negative[0] + x0, negative[1] + y0]] if inside else [],
                        "background_auto": auto,
                        "embedding_cached": hit,
                    }
                )
            encoder_runs, cached = self.encoder_runs, len(self._cache)
        instances = instances_from_semantic(mask, **predictor.instance_postprocess).astype(np.int32)
        info = {
            "image_size": [width, height],
            "windows": summary,
            "encoder_runs": encoder_runs,
            "cached_embeddings": cached,
            "nuclei_count": int(instances.max()),
        }
        return mask.astype(np.uint8), instances, info

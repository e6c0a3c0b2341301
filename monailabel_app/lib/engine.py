"""Click-driven SPPNet inference with a per-window embedding cache (no MONAI Label import here).

The server-independent part of the app, so that it can be used and tested on its own. It runs the
bundle's own pixel path (:class:`sppnet_monai.predict.Predictor`: ``inference.json``'s
``load_image`` and ``prompt_preprocessing`` transforms, network and threshold rule), so a click here
gives the mask ``predict`` and bundle inference give for the same image and clicks.

- **Window.** SPPNet sees ``image_size x image_size`` pixels. An image that fits is processed
  whole (padded by the network). A larger image is never resized: each foreground click is served
  by the window of ``image_size`` containing it whose origin lies on a grid of stride
  ``image_size / 2`` (plus the last window flush with the right/bottom border) and whose centre is
  nearest the click, so the click is at least ``image_size / 4`` from the window's edge (except
  at the image border) and nearby clicks share a window, hence an embedding.
- **Prompts.** The foreground clicks of a window are its positive clicks and its background clicks
  its negative ones, by the project's click rule (:mod:`sppnet_monai.clicks`: several positive
  clicks give the union of their masks, the first negative click in scan order is used). Without a
  background click in the window, the bundle's ``AutoClickd`` chooses one from the window's pixels
  (once per window: it is cached with the embedding).
- **Cache.** ``SPPNet.encode`` output of each window is kept in an LRU dictionary keyed by
  ``(image path, file mtime, file size, window)``, so a second click in the same window skips the
  encoder; :attr:`ClickSegmenter.encoder_runs` counts encoder calls. The cache is emptied when the
  checkpoint file changes (it is reloaded, e.g. after ``/train``).
- **Output.** The union of the windows' masks in a full-size ``(H, W)`` mask, split into nuclei by
  ``Predictor.split_nuclei`` (the instance head's watershed, or the distance watershed without one).
- **Errors.** Bad clicks and unreadable images raise :class:`~sppnet_monai.utils.SPPNetError`
  (:class:`ImageNotFoundError` for a missing image); the infer task answers them with HTTP 400 / 404.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sppnet_monai.clicks import click_pixels, first_in_scan_order
from sppnet_monai.utils import SPPNetError, root_message

logger = logging.getLogger(__name__)

__all__ = ["ClickSegmenter", "ImageNotFoundError", "choose_window", "nuclei_contours", "parse_clicks", "served_checkpoint"]

# Where the app's /train writes the model it then serves, relative to the bundle folder.
TRAINED_CHECKPOINT = Path("models") / "model.pt"


class ImageNotFoundError(SPPNetError):
    """The request names an image that does not exist: answered with HTTP 404."""


def parse_clicks(value: Any, name: str) -> list[list[float]]:
    """``[[x, y], ...]`` from request params (a list, or a JSON string of one); a 3rd value (slice index) is dropped.

    Raises SPPNetError for anything else; whether the clicks lie inside the image is checked later,
    by :func:`sppnet_monai.clicks.click_pixels`, the rule every path uses.
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise SPPNetError(f"'{name}' must be a list of [x, y] pairs, got the string {value[:80]!r}.") from err
    if not isinstance(value, (list, tuple)):
        raise SPPNetError(f"'{name}' must be a list of [x, y] pairs, got {type(value).__name__}.")
    clicks = []
    for point in value:
        if not isinstance(point, (list, tuple)) or len(point) < 2 or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in point[:2]
        ):
            raise SPPNetError(f"'{name}' must be a list of [x, y] pairs of numbers, got the element {point!r}.")
        clicks.append([point[0], point[1]])
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


def served_checkpoint(bundle_dir: Path) -> Path:
    """The model the app serves: the bundle's own trained ``models/model.pt`` (``/train`` writes it) when
    there is one, else the weights shipped with the bundle (``weights/sppnet_monuseg.pt``, inference.json's
    ``shipped_checkpoint``)."""
    trained = bundle_dir / TRAINED_CHECKPOINT
    return trained if trained.is_file() else bundle_dir / "weights" / "sppnet_monuseg.pt"


class ClickSegmenter:
    """A trained SPPNet bundle served click by click.

    Args:
        bundle_dir: a MONAI bundle folder with ``configs/inference.json`` and a model (see :attr:`checkpoint`).
        cache_size: how many window embeddings to keep (each ~12 MB at image_size 1024).
        overrides: ids of ``inference.json`` to override (e.g. ``threshold=0.4``); ``image_size``
            comes from the checkpoint's recipe, and a contradicting override is an error.
    """

    def __init__(self, bundle_dir: str | os.PathLike, cache_size: int = 8, **overrides: Any) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.config = self.bundle_dir / "configs" / "inference.json"
        self.cache_size = max(0, int(cache_size))
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.encoder_runs = 0
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._image: tuple[tuple, dict] | None = None  # the last image read: (key, loaded data)
        self._predictor = None
        self._model_stamp: tuple | None = None
        self._lock = threading.RLock()

    # -- model -------------------------------------------------------------------------------
    def _model(self):
        from sppnet_monai.predict import Predictor

        if not self.config.is_file():
            raise SPPNetError(f"no bundle inference config at {self.config}.")
        checkpoint = self.checkpoint
        if not checkpoint.is_file():
            raise SPPNetError(f"no model at {checkpoint}: train one (POST /train) or copy model.pt there.")
        stat = checkpoint.stat()
        stamp = (str(checkpoint), stat.st_mtime_ns, stat.st_size)
        if self._predictor is None or stamp != self._model_stamp:
            logger.info("loading SPPNet from %s", checkpoint)
            self._predictor = Predictor(str(checkpoint), self.config, **self.overrides)
            self._model_stamp = stamp
            self._cache.clear()
        return self._predictor

    @property
    def checkpoint(self) -> Path:
        return served_checkpoint(self.bundle_dir)

    @property
    def image_size(self) -> int:
        with self._lock:
            return self._model().image_size

    # -- image and embedding cache -------------------------------------------------------------
    def _loaded(self, path: Path, stamp: tuple, predictor) -> dict:
        """``{"image": (3, H, W) RGB 0-255}`` by the bundle's ``load_image``; the last image is kept."""
        key = (str(path), *stamp)
        if self._image is None or self._image[0] != key:
            try:
                loaded = predictor.load_image({"image": str(path)})
            except Exception as err:  # MONAI wraps the reader's error: answer it as the user's, not as a 500
                raise SPPNetError(f"cannot read image {path.name}: {root_message(err)}") from err
            self._image = (key, loaded)
        return self._image[1]

    def _window_entry(self, path: Path, stamp: tuple, window: tuple, predictor) -> tuple[dict, bool]:
        key = (str(path), *stamp, window)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry, True
        x0, y0, w, h = window
        rgb = self._loaded(path, stamp, predictor)["image"][:, y0 : y0 + h, x0 : x0 + w].clone()  # not a view of the image
        entry = {"rgb": rgb, "features": None, "auto_background": None}
        if self.cache_size:
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry, False

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._image = None

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def _segment_window(
        self, entry: dict, foreground: list, background: list, predictor
    ) -> tuple[np.ndarray, np.ndarray | None, list, bool]:
        """The window's mask ``(h, w)`` bool, instance-head map ``(h, w)`` (None without an instance head),
        the background click used (window pixels) and whether it was automatic."""
        auto = not background
        if auto and entry["auto_background"] is not None:
            background = entry["auto_background"]
        image = predictor.prompt({"image": entry["rgb"], "foreground": foreground, "background": background})
        network = predictor.network
        with predictor.autocast():
            if entry["features"] is None:
                entry["features"] = network.encode(image[None, :3].to(predictor.device))
                self.encoder_runs += 1
            logits = network.decode_guidance(entry["features"], image[None, 3:5].to(predictor.device))[0]
        used = first_in_scan_order(np.argwhere(image[4].cpu().numpy() > 0)[:, ::-1]).tolist()
        if auto and used:
            entry["auto_background"] = used
        return predictor.mask(logits), predictor.head_map(logits), used, auto

    def segment(
        self, image_path: str | os.PathLike, foreground: Sequence[Sequence[float]], background: Sequence[Sequence[float]] = ()
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Nuclei mask ``(H, W)`` uint8 0/1, instance map ``(H, W)`` int32 and a JSON-able summary."""
        from PIL import Image

        path = Path(image_path)
        if not path.is_file():
            raise ImageNotFoundError(f"image {path.name} not found.")
        try:
            stat = path.stat()
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, Image.DecompressionBombError) as err:
            raise SPPNetError(f"cannot read image {path.name}: {err}") from err
        if not len(foreground):
            raise SPPNetError("give at least one foreground click: params {\"foreground\": [[x, y]]}.")
        positive = click_pixels(foreground, width, height, "foreground", f"the {width}x{height} (WxH) image")
        negative = click_pixels(background, width, height, "background", f"the {width}x{height} (WxH) image")

        with self._lock:
            predictor = self._model()
            size = predictor.image_size
            stamp = (stat.st_mtime_ns, stat.st_size)
            mask = np.zeros((height, width), dtype=bool)
            head_map = None
            windows: dict[tuple, list] = {}
            for x, y in positive.tolist():
                windows.setdefault(choose_window(x, y, width, height, size), []).append([x, y])
            summary = []
            for window, clicks in windows.items():
                x0, y0, w, h = window
                entry, hit = self._window_entry(path, stamp, window, predictor)
                inside = [[x - x0, y - y0] for x, y in negative.tolist() if x0 <= x < x0 + w and y0 <= y < y0 + h]
                local = [[x - x0, y - y0] for x, y in clicks]
                window_mask, window_head, used, auto = self._segment_window(entry, local, inside, predictor)
                mask[y0 : y0 + h, x0 : x0 + w] |= window_mask
                if window_head is not None:
                    # Windows of several clicks overlap: the union of their masks, the larger head value
                    # (the union rule of several prompts, applied to the head's map too).
                    head_map = np.zeros((height, width), dtype=np.float32) if head_map is None else head_map
                    region = head_map[y0 : y0 + h, x0 : x0 + w]
                    np.maximum(region, window_head, out=region)
                summary.append(
                    {
                        "window": [x0, y0, w, h],
                        "foreground": clicks,
                        "background": [[x + x0, y + y0] for x, y in used],
                        "background_auto": auto,
                        "embedding_cached": hit,
                    }
                )
            encoder_runs, cached = self.encoder_runs, len(self._cache)
        instances = predictor.split_nuclei(mask, head_map).astype(np.int32)
        info = {
            "image_size": [width, height],
            "windows": summary,
            "encoder_runs": encoder_runs,
            "cached_embeddings": cached,
            "nuclei_count": int(instances.max()),
        }
        return mask.astype(np.uint8), instances, info

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
  ``(image path, file mtime, file size[, slide level], window)``, so a second click in the same window
  skips the encoder; :attr:`ClickSegmenter.encoder_runs` counts encoder calls. The cache is emptied
  when the checkpoint file changes (it is reloaded, e.g. after ``/train``).
- **Output.** The union of the windows' masks in a full-size ``(H, W)`` mask; only the bounding box of
  the clicks' windows (what the clicks changed) is split into nuclei by ``Predictor.split_nuclei``
  (the instance head's watershed, or the distance watershed without one).
- **Slides** (:meth:`ClickSegmenter.segment_region`, MONAI Label's ``/infer/wsi`` tiles): a tile with a
  positive click that fits in one window of the click grid (on the slide level's pixels) is
  answered from that window; any other tile (no click: QuPath's "segment this rectangle") goes
  through :class:`sppnet_monai.slide_inference.SlideSegmenter`. Nuclei are records with contours
  in level-0 slide pixels, kept by the tile holding their centroid.
- **Clicks first.** One lock (:class:`ClicksFirst`) guards the model and the caches: a click holds it for its
  request, region work for one tile of :data:`REGION_STEP` pixels at a time, and a waiting click goes before
  the next tile. Running regions report their progress (:attr:`ClickSegmenter.regions`) and stop at the next
  tile after :meth:`ClickSegmenter.cancel_regions`.
- **Errors.** Bad clicks and unreadable images raise :class:`~sppnet_monai.utils.SPPNetError`
  (:class:`ImageNotFoundError` for a missing image); the infer task answers them with HTTP 400 / 404.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from sppnet_monai.clicks import choose_window, click_pixels, first_in_scan_order, grid_origins
from sppnet_monai.data.instances import relabel_consecutive
from sppnet_monai.data.slides import Slide
from sppnet_monai.nuclei import nuclei_records
from sppnet_monai.slide_inference import SlideSegmenter, level_region, tile_grid
from sppnet_monai.utils import SPPNetError, root_message

logger = logging.getLogger(__name__)

__all__ = ["ClickSegmenter", "ClicksFirst", "ImageNotFoundError", "RegionCancelled", "choose_window", "parse_clicks", "served_checkpoint"]

# Where the app's /train writes the model it then serves, relative to the bundle folder.
TRAINED_CHECKPOINT = Path("models") / "model.pt"


# Tile side (pixels of the level read) of one step of region work between two clicks.
REGION_STEP = 256


class ImageNotFoundError(SPPNetError):
    """The request names an image that does not exist: answered with HTTP 404."""


class RegionCancelled(SPPNetError):
    """A region request stopped by :meth:`ClickSegmenter.cancel_regions`: answered with HTTP 409."""


class ClicksFirst:
    """The engine's lock, taken by clicks ahead of the next step of a region.

    A click holds it for its whole request (one window, ~0.1-0.2 s); a region holds it one tile at a time and,
    before each tile, waits while a click is waiting, so that a click never waits for more than one tile of
    a large rectangle or a whole slide. (One lock, not a queue of workers: on 2 cores one model at a time
    is what runs fastest, and the window caches are the engine's state.)
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clicks = threading.Condition()
        self._waiting = 0

    @contextlib.contextmanager
    def click(self) -> Iterator[None]:
        with self._clicks:
            self._waiting += 1
        try:
            with self._lock:
                yield
        finally:
            with self._clicks:
                self._waiting -= 1
                self._clicks.notify_all()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._clicks:
            self._clicks.wait_for(lambda: self._waiting == 0)
        with self._lock:
            yield


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
        self._open_slide: tuple[tuple, Slide] | None = None  # the last slide read: (key, slide)
        self._predictor = None
        self._segmenter: SlideSegmenter | None = None  # the predictor's slide path (tile context from the config)
        self._model_stamp: tuple | None = None
        self._gate = ClicksFirst()
        self._lock = self._gate._lock  # the state's lock, for the short sections that are neither click nor region step
        self._cancelled = 0  # cancel_regions() count: a region started before the last cancel stops at its next tile
        self.regions: dict[int, dict] = {}  # progress of the running region requests, by request number
        self._region_numbers = itertools.count(1)

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
            # Region work goes in steps of REGION_STEP tiles (not the config's 1024), so that a click waits for
            # one small tile at most; windows lie on one grid per level and are cached, so results hardly change.
            self._segmenter = SlideSegmenter(self._predictor, **{**self._predictor.slide_inference, "tile_size": REGION_STEP})
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

    def _window_entry(self, key: tuple, window: tuple, read) -> tuple[dict, bool]:
        """The cache entry of ``window`` ``(x0, y0, w, h)`` under ``key``; ``read(window)`` gives its ``(3, h, w)`` RGB."""
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            return entry, True
        entry = {"rgb": read(window), "features": None, "auto_background": None}
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
    ) -> tuple[torch.Tensor, list, bool]:
        """The window's logits ``(C, h, w)`` (mask, then the instance head's and the click head's channels),
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
        return logits.float(), used, auto

    def segment(
        self,
        image_path: str | os.PathLike,
        foreground: Sequence[Sequence[float]],
        background: Sequence[Sequence[float]] = (),
        clicked_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Nuclei mask ``(H, W)`` uint8 0/1, instance map ``(H, W)`` int32 and a JSON-able summary.

        With ``clicked_only`` and a network with a click head, the clicked nuclei alone (the click tool);
        otherwise every nucleus of the clicks' windows, the mask ``predict`` gives for the same clicks.
        """
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

        with self._gate.click():
            predictor = self._model()
            size = predictor.image_size
            stamp = (stat.st_mtime_ns, stat.st_size)
            mask = np.zeros((height, width), dtype=bool)
            head_map = None
            clicked = np.zeros((height, width), dtype=np.int32)
            clicked_only = clicked_only and predictor.clicked_channel is not None
            windows: dict[tuple, list] = {}
            for x, y in positive.tolist():
                windows.setdefault(choose_window(x, y, width, height, size), []).append([x, y])
            summary = []
            for window, clicks in windows.items():
                x0, y0, w, h = window
                read = lambda win: self._loaded(path, stamp, predictor)["image"][:, win[1] : win[1] + win[3], win[0] : win[0] + win[2]].clone()  # noqa: E731
                entry, hit = self._window_entry((str(path), *stamp, window), window, read)
                inside = [[x - x0, y - y0] for x, y in negative.tolist() if x0 <= x < x0 + w and y0 <= y < y0 + h]
                local = [[x - x0, y - y0] for x, y in clicks]
                logits, used, auto = self._segment_window(entry, local, inside, predictor)
                if clicked_only:
                    nuclei = predictor.clicked_instances(logits, local)
                    region = clicked[y0 : y0 + h, x0 : x0 + w]
                    fresh = (nuclei > 0) & (region == 0)
                    region[fresh] = nuclei[fresh] + clicked.max()
                    mask[y0 : y0 + h, x0 : x0 + w] |= nuclei > 0
                else:
                    mask[y0 : y0 + h, x0 : x0 + w] |= predictor.mask(logits)
                window_head = None if clicked_only else predictor.head_map(logits)
                if window_head is not None:
                    # Windows of several clicks overlap: the union of their masks, the larger head value
                    # (the union rule of several prompts, applied to the head's map too). HoVer-Net's maps are
                    # signed ramps that a maximum would flatten: there the later window's maps are kept.
                    head_map = np.zeros((*window_head.shape[:-2], height, width), dtype=np.float32) if head_map is None else head_map
                    region = head_map[..., y0 : y0 + h, x0 : x0 + w]
                    if predictor.instance_head == "hv":
                        region[...] = window_head
                    else:
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
        # Only the clicks' windows changed: split the nuclei of their bounding box, not of the whole image.
        x0, y0 = min(w[0] for w in windows), min(w[1] for w in windows)
        x1, y1 = max(w[0] + w[2] for w in windows), max(w[1] + w[3] for w in windows)
        instances = np.zeros((height, width), dtype=np.int32)
        box = np.s_[y0:y1, x0:x1]
        if clicked_only:  # a nucleus answered by two windows keeps one id; ids renumbered 1..N
            instances = relabel_consecutive(clicked, dtype=np.int32)
        else:
            instances[box] = predictor.split_nuclei(mask[box], None if head_map is None else head_map[(..., *box)])
        info = {
            "image_size": [width, height],
            "windows": summary,
            "encoder_runs": encoder_runs,
            "cached_embeddings": cached,
            "nuclei_count": int(instances.max()),
            "changed": [x0, y0, x1 - x0, y1 - y0],
        }
        return mask.astype(np.uint8), instances, info

    # -- whole-slide regions (MONAI Label's /infer/wsi tiles) --------------------------------------
    def _slide(self, path: Path) -> tuple[Slide, tuple]:
        """The open slide of ``path`` (kept open for the next tile) and its file stamp."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if self._open_slide is None or self._open_slide[0] != key:
            if self._open_slide is not None:
                self._open_slide[1].close()
            self._open_slide = (key, Slide(path))
        return self._open_slide[1], key

    def segment_region(
        self,
        image_path: str | os.PathLike,
        region: Sequence[int] | None,
        level: int = 0,
        foreground: Sequence[Sequence[float]] = (),
        background: Sequence[Sequence[float]] = (),
        min_area: float = 0.0,
        clicked_only: bool = False,
        cancel_count: int | None = None,
    ) -> tuple[list[dict], dict]:
        """Nuclei records (level-0 pixels, :func:`sppnet_monai.nuclei.nuclei_records`) whose centroid lies in
        ``region`` ``(x, y, w, h)`` (level-0 pixels; None or zero size: the whole image) read at ``level``, and
        a JSON-able summary. Clicks are level-0 pixels; those outside the region are another tile's and unused.

        A region with a positive click that fits in one window of the click grid is served from that
        window's cached embedding (an interactive click); any other region is segmented tile-wise with
        automatic prompts where it has no click (:class:`~sppnet_monai.slide_inference.SlideSegmenter`).
        With ``clicked_only`` (the click tool) and a network with a click head, a click's window answers with
        the clicked nuclei alone; otherwise the area's nuclei are corrected by its clicks (a positive click
        outside every nucleus adds the one under it, a negative click on a nucleus removes it).
        ``cancel_count``: :attr:`cancel_count` when the request that this region is part of began (MONAI Label
        cuts a rectangle into many regions); a cancel since then stops it (:class:`RegionCancelled`).
        """
        since = self._cancelled if cancel_count is None else cancel_count
        if self._cancelled != since:
            raise RegionCancelled(f"the region request on {Path(image_path).name} was cancelled.")
        path = Path(image_path)
        if not path.is_file():
            raise ImageNotFoundError(f"image {path.name} not found.")
        # A request with a positive click is a click (served first); any other one is region work.
        with (self._gate.click() if len(foreground) else self._gate.step()):
            predictor = self._model()
            slide, stamp = self._slide(path)
            region = None if region is None or not all(region[2:]) else tuple(int(v) for v in region)
            area, scale = level_region(slide, region, level)
            ax, ay, aw, ah = area
            in_area = lambda clicks: [[x, y] for x, y in clicks if ax <= x / scale < ax + aw and ay <= y / scale < ay + ah]  # noqa: E731
            foreground, background = in_area(foreground), in_area(background)  # level 0
            fg, bg = ([[x / scale, y / scale] for x, y in clicks] for clicks in (foreground, background))  # level pixels
            size = predictor.image_size
            width, height = slide.size(level)
            window = _covering_window(area, width, height, size) if fg else None
            if window is not None:
                x0, y0, w, h = window
                entry, hit = self._window_entry((*stamp, level, window), window, _slide_reader(slide, level))
                local = lambda clicks: [[int(x) - x0, int(y) - y0] for x, y in clicks if x0 <= x < x0 + w and y0 <= y < y0 + h]  # noqa: E731
                logits, used, auto = self._segment_window(entry, local(fg), local(bg), predictor)
                if clicked_only and predictor.clicked_channel is not None:
                    instances = predictor.clicked_instances(logits, local(fg))
                else:
                    nucleus_at = None
                    if predictor.clicked_channel is not None:
                        nucleus_at = lambda click: predictor.clicked_nucleus(logits[predictor.clicked_channel], click)  # noqa: E731
                    split = predictor.split_nuclei(predictor.mask(logits), predictor.head_map(logits))
                    instances = predictor.edit_instances(split, local(fg), local(bg), nucleus_at)
                left, top = ax - x0, ay - y0
                records = nuclei_records(
                    instances, origin=(x0 * scale, y0 * scale), scale=scale,
                    keep=lambda cx, cy: left <= cx < left + aw and top <= cy < top + ah,
                )
                info = {
                    "mode": "click",
                    "windows": [{"window": [x0, y0, w, h], "level": level, "embedding_cached": hit, "background_auto": auto}],
                }
            else:
                segmenter = self._segmenter
        if window is None:
            # MONAI Label cuts a region into tiles of the request's tile_size; a larger area (a direct
            # request, size 0 for the whole image) still goes tile by tile, in the memory of one tile, one
            # tile per step of the gate, on a slide of its own (a click may open another image meanwhile).
            with Slide(path) as own_slide:
                tiles = segmenter.segment_region(own_slide, region, level, foreground, background)
                records = self._region_steps(path.name, tiles, area, segmenter.tile_size, since)
                with self._gate.step():
                    records = self._edit_records(records, own_slide, stamp, level, scale, fg, bg, predictor)
            info = {"mode": "automatic" if not fg else "tiled", "windows": []}
        records = [r for r in records if r["area"] >= min_area]
        info.update(encoder_runs=self.encoder_runs, cached_embeddings=len(self._cache), nuclei_count=len(records))
        return records, info

    def _region_steps(self, name: str, tiles: Iterator, area: tuple, tile_size: int, cancelled: int) -> list[dict]:
        """The nuclei records of ``tiles`` (``SlideSegmenter.segment_region``), one tile per step of the gate:
        progress in :attr:`regions`, stopped by a :meth:`cancel_regions` after ``cancelled`` (:class:`RegionCancelled`)."""
        number = next(self._region_numbers)
        total = len(tile_grid(area, tile_size))
        progress = self.regions[number] = {"image": name, "area": list(area), "tiles": total, "done": 0, "started": time.time()}
        records: list[dict] = []
        try:
            while True:
                with self._gate.step():
                    if self._cancelled != cancelled:
                        raise RegionCancelled(f"the region request on {name} was cancelled after {progress['done']} of {total} tiles.")
                    tile = next(tiles, None)
                if tile is None:
                    return records
                records += tile[2]
                progress["done"] += 1
                if progress["done"] % 16 == 0:
                    logger.info("%s: %d of %d tiles, %d nuclei", name, progress["done"], total, len(records))
        finally:
            del self.regions[number]

    @property
    def cancel_count(self) -> int:
        """How many times :meth:`cancel_regions` was called: a request records it when it begins."""
        return self._cancelled

    def cancel_regions(self) -> int:
        """Stop every running region request at its next tile; returns how many regions were running."""
        self._cancelled += 1
        return len(self.regions)

    @torch.no_grad()
    def window_entropy(self, image_path: str | os.PathLike, window: tuple[int, int, int, int]) -> float:
        """Mean pixel entropy of the served model's nuclei probability on ``window`` ``(x, y, w, h)`` of level 0,
        automatic prompt (:func:`sppnet_monai.active_learning.mean_entropy`): how unsure the model is there."""
        from sppnet_monai.active_learning import mean_entropy

        with self._gate.step():
            predictor = self._model()
            slide, _ = self._slide(Path(image_path))  # kept open: the strategy scores several windows of one image
            rgb = torch.from_numpy(slide.read(*window)).float()
            logits = predictor.logits(predictor.prompt({"image": rgb, "foreground": [], "background": []}))
        return mean_entropy(torch.sigmoid(logits[0]))

    def _edit_records(
        self, records: list[dict], slide: Slide, stamp: tuple, level: int, scale: float, fg: list, bg: list, predictor
    ) -> list[dict]:
        """Tile-wise ``records`` corrected by the clicks ``fg`` / ``bg`` (level pixels): the nucleus whose contour holds
        a negative click is dropped; a positive click inside no contour adds the click head's nucleus under it,
        decoded in the click's window of the grid (its embedding cached as a click's)."""
        from shapely.geometry import Point, Polygon

        if not fg and not bg:
            return records
        polygons = [Polygon(r["contour"]) for r in records]
        at = lambda x, y: next((i for i, p in enumerate(polygons) if p.covers(Point(x * scale, y * scale))), None)  # noqa: E731
        dropped = {at(x, y) for x, y in bg} - {None}
        kept = [r for i, r in enumerate(records) if i not in dropped]
        if predictor.clicked_channel is None:
            return kept
        width, height = slide.size(level)
        for x, y in fg:
            on = at(x, y)
            if on is not None and on not in dropped:
                continue
            window = choose_window(int(x), int(y), width, height, predictor.image_size)
            x0, y0, w, h = window
            entry, _ = self._window_entry((*stamp, level, window), window, _slide_reader(slide, level))
            click = [int(x) - x0, int(y) - y0]
            logits, _, _ = self._segment_window(entry, [click], [], predictor)
            nucleus = predictor.clicked_instances(logits, [click])
            kept += nuclei_records(nucleus, origin=(x0 * scale, y0 * scale), scale=scale)
        return kept


def _slide_reader(slide: Slide, level: int):
    """``read(window)`` for :meth:`ClickSegmenter._window_entry`: the ``(3, h, w)`` float RGB of ``window`` at ``level``."""
    return lambda window: torch.from_numpy(slide.read(*window, level)).float()


def _covering_window(area: tuple, width: int, height: int, size: int) -> tuple | None:
    """The window of the click grid (:func:`~sppnet_monai.clicks.grid_origins`) that holds all of ``area`` ``(x, y, w, h)`` with its
    centre nearest the area's; None if no window holds it."""
    origin = []
    for start, extent, length in ((area[0], area[2], width), (area[1], area[3], height)):
        starts = [o for o in grid_origins(length, size) if o <= start and start + extent <= o + size]
        if not starts:
            return None
        origin.append(min(starts, key=lambda o: abs(o + size / 2 - (start + extent / 2))))
    return origin[0], origin[1], min(size, width), min(size, height)

"""Nuclei of any region of any slide, tile by tile, in bounded memory, each nucleus once and whole.

The region (level-0 pixels, read at ``level``) is cut into square *tiles* (``tile_size`` level
pixels). Each tile is segmented with context: the network's windows are placed on one grid for the
whole level (MONAI's sliding-window rule over the level: stride ``image_size * (1 - sw_overlap)``,
last window flush with the level's edge), and a tile reads and infers every window of that grid
that meets the tile grown by ``margin``. Inside that band each pixel's blended logits are therefore
those of the whole level seen at once, whichever tile computed them, so a nucleus near a tile edge
is segmented the same in both tiles; it is kept by the one tile whose area holds its centroid.
A nucleus is cut only if it reaches more than ``margin`` pixels beyond the tile holding its
centroid (the default margin is several nucleus diameters at 40x).

Prompts follow the prompted sliding-window inferer: user clicks in the windows that contain them,
an automatic click (``AutoClickd``'s rule) in every other window. The image-level automatic click of
``predict`` on a plain image is not used here, since it would depend on the tile.

Memory is that of one tile with its context, whatever the region's size.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from sppnet_monai.data.slides import Region, Slide
from sppnet_monai.inferers import WindowLogitCache, window_grid
from sppnet_monai.nuclei import nuclei_records
from sppnet_monai.utils import SPPNetError

__all__ = ["SlideSegmenter", "level_region", "tile_grid"]

MIN_TILE, MAX_TILE = 32, 4096  # below: thousands of calls per region; above: one tile's buffers exceed ~1 GiB


def level_region(slide: Slide, region: Region | None, level: int) -> tuple[Region, float]:
    """The level-0 ``region`` (None: the whole slide) as ``(x, y, w, h)`` pixels of ``level``, and that level's downsample."""
    slide.check_level(level)
    region = slide.check_region(region) if region is not None else (0, 0, *slide.size(0))
    scale = slide.downsample(level)
    width, height = slide.size(level)
    x0, y0 = int(region[0] // scale), int(region[1] // scale)
    x1, y1 = min(width, math.ceil((region[0] + region[2]) / scale)), min(height, math.ceil((region[1] + region[3]) / scale))
    return (x0, y0, max(1, x1 - x0), max(1, y1 - y0)), scale


def tile_grid(region: Region, tile_size: int) -> list[Region]:
    """The tiles ``(x, y, w, h)`` partitioning ``region`` (same pixels), row by row."""
    x, y, w, h = region
    return [
        (tx, ty, min(tile_size, x + w - tx), min(tile_size, y + h - ty))
        for ty in range(y, y + h, tile_size)
        for tx in range(x, x + w, tile_size)
    ]


def check_tile_size(tile_size) -> int:
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or not MIN_TILE <= tile_size <= MAX_TILE:
        raise SPPNetError(f"tile_size must be an integer from {MIN_TILE} to {MAX_TILE} pixels, got {tile_size!r}.")
    return int(tile_size)


class SlideSegmenter:
    """The bundle's pixel path (:class:`~sppnet_monai.predict.Predictor`) over slide regions.

    Args:
        predictor: the loaded bundle inference (network, transforms, inferer, instance rule).
        tile_size: tile side in pixels of the level read.
        margin: context around a tile, in pixels of the level read.
        window_cache_mib: memory for the logits of windows already computed (:class:`WindowLogitCache`), which
            the next tiles of the row and of the next row need again for their context. Tiles go row by
            row, so each window runs once while a row of tiles' windows fits (about 8192 pixels wide
            per 128 MiB for a one-channel network at image_size 256); wider, the row below recomputes some.
    """

    def __init__(self, predictor, tile_size: int = 1024, margin: int = 64, window_cache_mib: float = 0) -> None:
        self.predictor = predictor
        self.tile_size = check_tile_size(tile_size)
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise SPPNetError(f"margin must be a non-negative integer number of pixels, got {margin!r}.")
        self.margin = int(margin)
        self.window_cache = WindowLogitCache(window_cache_mib)
        self._axes: dict[tuple[int, int], np.ndarray] = {}

    def _starts(self, length: int) -> tuple[np.ndarray, int]:
        """Window starts of the level-wide grid along an axis of ``length`` pixels, and the window length."""
        roi = min(self.predictor.image_size, length)
        key = (length, roi)
        if key not in self._axes:
            self._axes[key] = np.array([w[0].start for w in window_grid((length,), (roi,), self.predictor.inferer.overlap)])
        return self._axes[key], roi

    def _extent(self, start: int, stop: int, length: int) -> tuple[int, int]:
        """``[a, b)``: the union of the grid's windows that meet ``[start - margin, stop + margin)``."""
        starts, roi = self._starts(length)
        lo, hi = max(0, start - self.margin), min(length, stop + self.margin)
        meeting = starts[(starts < hi) & (starts + roi > lo)]
        return int(meeting.min()), int(meeting.max()) + roi

    @torch.no_grad()
    def segment_tile(
        self,
        slide: Slide,
        level: int,
        tile: Region,
        foreground: Sequence[Sequence[float]] = (),
        background: Sequence[Sequence[float]] = (),
        scale: float = 1.0,
    ) -> list[dict]:
        """Nuclei records (:func:`~sppnet_monai.nuclei.nuclei_records`, in level-0 pixels) whose centroid lies in
        ``tile`` (pixels of ``level``). Clicks are ``[x, y]`` pixels of ``level``; those outside the tile's context are unused."""
        width, height = slide.size(level)
        tx, ty, tw, th = tile
        x0, x1 = self._extent(tx, tx + tw, width)
        y0, y1 = self._extent(ty, ty + th, height)
        rgb = torch.from_numpy(slide.read(x0, y0, x1 - x0, y1 - y0, level)).float()

        def local(clicks):
            return [[int(x) - x0, int(y) - y0] for x, y in clicks if x0 <= x < x1 and y0 <= y < y1]

        image = self.predictor.encode_clicks({"image": rgb, "foreground": local(foreground), "background": local(background)})
        logits = self.predictor.logits(image, self.window_cache)
        mask = self.predictor.mask(logits)
        instances = self.predictor.split_nuclei(mask, self.predictor.head_map(logits))
        left, top = tx - x0, ty - y0
        return nuclei_records(
            instances,
            origin=(x0 * scale, y0 * scale),
            scale=scale,
            keep=lambda cx, cy: left <= cx < left + tw and top <= cy < top + th,
        )

    def segment_region(
        self,
        slide: Slide,
        region: Region | None = None,
        level: int = 0,
        foreground: Sequence[Sequence[float]] = (),
        background: Sequence[Sequence[float]] = (),
        skip: int = 0,
    ) -> Iterator[tuple[int, Region, list[dict]]]:
        """``(tile index, tile, nuclei)`` for each tile of ``region`` (level-0 pixels; None: the whole slide), in
        order from tile ``skip``. Clicks are level-0 pixels; each goes to the windows that contain it."""
        area, scale = level_region(slide, region, level)
        fg = [[x / scale, y / scale] for x, y in foreground]
        bg = [[x / scale, y / scale] for x, y in background]
        for index, tile in enumerate(tile_grid(area, self.tile_size)):
            if index >= skip:
                yield index, tile, self.segment_tile(slide, level, tile, fg, bg, scale)

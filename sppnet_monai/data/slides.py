"""Whole-slide images and plain images behind one region reader.

A slide (every format OpenSlide reads: .svs, .ndpi, .mrxs, .scn, pyramidal tiled .tif, ...) is read
region by region through MONAI's :class:`~monai.data.OpenSlideWSIReader`, never whole; a plain image
(PNG, JPEG, a TIFF OpenSlide does not take) is read whole once, as ``predict`` always did.

Coordinates follow OpenSlide and QuPath: a region's ``x, y, width, height`` are level-0 (full
resolution) pixels whatever the level it is read at; ``level`` only chooses the resolution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sppnet_monai.utils import SPPNetError

__all__ = ["Region", "Slide", "parse_region"]

Region = tuple[int, int, int, int]  # x, y, width, height in level-0 pixels


def parse_region(value: str | Sequence[int] | None) -> Region | None:
    """``(x, y, width, height)`` from ``"x,y,w,h"`` or a sequence of 4 integers; None stays None."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        region = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        region = ()
    if len(region) != 4 or region[0] < 0 or region[1] < 0 or region[2] <= 0 or region[3] <= 0:
        raise SPPNetError(f"region must be x,y,width,height with x, y >= 0 and width, height > 0, got {value!r}.")
    return region  # type: ignore[return-value]


class Slide:
    """One image read region by region: an OpenSlide slide, or a plain image held in memory.

    Args:
        path: the file; OpenSlide is tried first, then the bundle's plain-image reader.

    Attributes:
        level_count: number of pyramid levels (1 for a plain image).
        mpp: microns per pixel ``(x, y)`` at level 0, None when the file does not say.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SPPNetError(f"{self.path} does not exist.")
        self._wsi = None
        self._pixels: np.ndarray | None = None
        fmt = _openslide_format(self.path)
        if fmt is not None:
            from monai.data import OpenSlideWSIReader

            self._reader = OpenSlideWSIReader(channel_dim=0)
            try:
                self._wsi = self._reader.read(str(self.path))
            except Exception as err:  # OpenSlide's errors name neither the file nor a user-level cause
                raise SPPNetError(f"{self.path.name}: cannot open slide ({fmt}): {err}") from err
            self.format = fmt
            self.level_count = int(self._reader.get_level_count(self._wsi))
            self._sizes = [tuple(reversed(self._reader.get_size(self._wsi, lv))) for lv in range(self.level_count)]
            self._downsamples = [float(self._reader.get_downsample_ratio(self._wsi, lv)) for lv in range(self.level_count)]
            props = self._wsi.properties
            has_mpp = "openslide.mpp-x" in props and "openslide.mpp-y" in props
            self.mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])) if has_mpp else None
        else:
            from sppnet_monai.data.image_io import read_rgb

            self._pixels = read_rgb(self.path)  # (H, W, 3) uint8; raises SPPNetError naming the file
            self.format = "image"
            self.level_count = 1
            self._sizes = [(self._pixels.shape[1], self._pixels.shape[0])]
            self._downsamples = [1.0]
            self.mpp = None

    @property
    def is_slide(self) -> bool:
        """True for an OpenSlide slide (read region by region), False for a plain image."""
        return self._wsi is not None

    def size(self, level: int = 0) -> tuple[int, int]:
        """``(width, height)`` of ``level``."""
        return self._sizes[self.check_level(level)]

    def downsample(self, level: int) -> float:
        return self._downsamples[self.check_level(level)]

    def check_level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level < self.level_count:
            raise SPPNetError(f"{self.path.name} has levels 0..{self.level_count - 1}, not level {level!r}.")
        return int(level)

    def check_region(self, region: Region) -> Region:
        """``region`` if it lies inside the slide's level 0, else an error naming both."""
        x, y, w, h = region
        width, height = self._sizes[0]
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > width or y + h > height:
            raise SPPNetError(f"region x={x}, y={y}, w={w}, h={h} is not inside {self.path.name} ({width}x{height} at level 0).")
        return region

    def read(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """``(3, height, width)`` uint8 RGB of the rectangle at ``(x, y)`` of ``level``, in that level's pixels."""
        level_width, level_height = self.size(level)
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > level_width or y + height > level_height:
            raise SPPNetError(f"{self.path.name}: {width}x{height} at ({x}, {y}) is outside level {level} ({level_width}x{level_height}).")
        if self._pixels is not None:
            return np.ascontiguousarray(np.moveaxis(self._pixels[y : y + height, x : x + width], -1, 0))
        scale = self._downsamples[level]
        location = (int(round(y * scale)), int(round(x * scale)))  # MONAI: (row, column) at level 0
        try:
            data, _ = self._reader.get_data(self._wsi, location=location, size=(height, width), level=level, mode="RGB")
        except Exception as err:  # a corrupt tile surfaces only when it is decoded
            raise SPPNetError(f"{self.path.name}: cannot read level {level} at ({x}, {y}): {err}") from err
        return np.ascontiguousarray(data[:3], dtype=np.uint8)

    def close(self) -> None:
        """Release the file and the pixels; the geometry (levels, sizes, ``check_*``) stays usable."""
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None
        self._pixels = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _openslide_format(path: Path) -> str | None:
    """OpenSlide's name for the file's format, None when OpenSlide does not read it (or is not installed)."""
    try:
        import openslide
    except ImportError:  # plain images still work without it
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


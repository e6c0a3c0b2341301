"""Clicks: the one rule for where a click is, and what several clicks mean.

A click is ``(x, y) = (column, row)`` in pixels of the image it is given for, as in SAM. Pixel
centres sit at integer coordinates (SAM's prompt encoder adds 0.5 to reach them), so a click is
on pixel ``(floor(x + 0.5), floor(y + 0.5))`` and lies inside a ``W x H`` image exactly when
``-0.5 <= x < W - 0.5`` and ``-0.5 <= y < H - 0.5``. Every path (the network, the click-channel
transform, clicks files, the MONAI Label app) checks clicks with :func:`click_pixels`.

Several clicks: every foreground click is a prompt of its own, paired with one background click,
and the result is the union of the prompts' masks (pixel-wise maximum of their logits). The
background click used is the first in scan order (top row first, then left-most): the order in
which the network reads it from its click map. See ``SPPNet.forward``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sppnet_monai.utils import SPPNetError

__all__ = ["choose_window", "click_pixels", "first_in_scan_order", "grid_origins"]


def click_pixels(
    clicks: Any, width: int, height: int, name: str = "click", where: str = "the image", origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """The pixels ``(N, 2)`` int64 ``(col, row)`` of ``clicks`` (``[[x, y], ...]``) in a ``width x height`` image
    (or in the ``width x height`` region at ``origin`` of a slide).

    Raises:
        SPPNetError: (one line) for clicks that are not ``[x, y]`` pairs of finite numbers, or that lie
            outside the image, naming the click, ``where`` and the size.
    """
    if clicks is None or len(clicks) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    try:
        xy = np.asarray(clicks, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        xy = None
    if xy is None or xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise SPPNetError(f"{name} clicks must be a list of [x, y] pairs of numbers, got {clicks!r}.")
    pixels = np.floor(xy + 0.5)
    x0, y0 = origin
    outside = (pixels[:, 0] < x0) | (pixels[:, 0] >= x0 + width) | (pixels[:, 1] < y0) | (pixels[:, 1] >= y0 + height)
    if outside.any():
        x, y = xy[int(np.argmax(outside))]
        if origin != (0, 0):
            raise SPPNetError(f"{name} click [{x:g}, {y:g}] is outside {where} (x={x0}, y={y0}, w={width}, h={height}).")
        raise SPPNetError(
            f"{name} click [{x:g}, {y:g}] is outside {where} ({width}x{height}, clicks are [x, y] with "
            f"-0.5 <= x < {width - 0.5:g} and -0.5 <= y < {height - 0.5:g})."
        )
    return pixels.astype(np.int64)


def first_in_scan_order(pixels: np.ndarray) -> np.ndarray:
    """The first of ``pixels`` ``(N, 2)`` ``(col, row)`` in scan order (lowest row, then column): ``(1, 2)``."""
    if len(pixels) == 0:
        return pixels[:0]
    order = np.lexsort((pixels[:, 0], pixels[:, 1]))
    return pixels[order[:1]]


def grid_origins(length: int, size: int) -> list[int]:
    """Window starts of the click grid along an axis of ``length``: side ``size``, stride ``size / 2``, the last
    one flush with the border (one window from 0 when the axis is no longer than a window)."""
    if length <= size:
        return [0]
    return list(range(0, length - size, size // 2)) + [length - size]


def _window_origin(click: int, length: int, size: int) -> int:
    return min(grid_origins(length, size), key=lambda o: abs(o + size / 2 - click))


def choose_window(x: int, y: int, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` of the window of side ``size`` that serves a click at ``(x, y)`` in a ``width x height`` image:
    of the click grid's windows (:func:`grid_origins`), the one whose centre is nearest the click."""
    x0, y0 = _window_origin(x, width, size), _window_origin(y, height, size)
    return x0, y0, min(size, width), min(size, height)

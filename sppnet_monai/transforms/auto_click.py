"""Clicks chosen without ground truth, for inference when the user gives none (or no background click)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from .prompt import ClickKeysTransform, nucleus_center

__all__ = ["AutoClickd", "choose_clicks", "hematoxylin_mask"]


def hematoxylin_mask(rgb: np.ndarray, blur_sigma: float = 1.0) -> np.ndarray:
    """Classical nuclei estimate: Otsu threshold of the blurred hematoxylin channel.

    Args:
        rgb: ``(3, H, W)`` image in 0-255.

    Returns:
        ``(H, W)`` bool, True where the stain looks like a nucleus.
    """
    hed = rgb2hed(np.clip(np.moveaxis(rgb, 0, -1), 0, 255).astype(np.float32) / 255.0)
    hematoxylin = ndimage.gaussian_filter(hed[..., 0], blur_sigma)
    if np.ptp(hematoxylin) == 0:
        return np.zeros(hematoxylin.shape, dtype=bool)
    return hematoxylin > threshold_otsu(hematoxylin)


def choose_clicks(rgb: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """Positive and negative click lists (``[[x, y]]`` or ``[]``) for an RGB ``(3, H, W)`` 0-255 image.

    The positive click is the L1 centre (:func:`nucleus_center`) of the hematoxylin mask, i.e. the
    centre of its thickest nucleus-like blob; the negative click is the background pixel farthest
    from any such blob (and from the border). An empty (full) mask gives no positive (negative) click.
    """
    nuclei = hematoxylin_mask(rgb)
    return tuple([list(nucleus_center(region))] if region.any() else [] for region in (nuclei, ~nuclei))


class AutoClickd(ClickKeysTransform):
    """Fill missing clicks from the image alone: a deterministic stand-in for a user's clicks.

    Clicks come from :func:`choose_clicks`; those the data already has are kept: with
    ``d["foreground"] = [[x, y]]`` and no background click only the background one is chosen.

    Args:
        keys: the RGB image ``(3, H, W)`` in 0-255 (before normalisation).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            missing = [k for k in (self.foreground_key, self.background_key) if not len(d.get(k) or [])]
            if not missing:
                continue
            chosen = choose_clicks(convert_to_numpy(d[key])[:3])
            for click_key, clicks in zip((self.foreground_key, self.background_key), chosen):
                if click_key in missing:
                    d[click_key] = clicks
        return d

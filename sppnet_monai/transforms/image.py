"""Image-side transforms: bring any loaded image to 3-channel RGB in 0-255 (the project's one RGB rule)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from sppnet_monai.utils import SPPNetError

__all__ = ["EnsureRGB", "EnsureRGBd"]

_MAX_8BIT = 255.0
_MAX_16BIT = 65535.0


class EnsureRGB(Transform):
    """Make each image a (3, H, W) float32 RGB array with intensities in 0-255.

    Every image the project reads goes through this rule: the bundle's transforms (via
    :class:`EnsureRGBd`) and ``prepare`` (``sppnet_monai.data.image_io.to_rgb_uint8``, which rounds
    the result to uint8).

    Input: a channel-first (C, H, W) numpy array, torch tensor or MetaTensor, as given by
    ``LoadImaged(..., reader="PILReader", reverse_indexing=False, ensure_channel_first=True)``.
    Output: (3, H, W) float32 of the same type and device (MetaTensor metadata is kept).

    Channels:

    - 1 (grayscale): repeated to 3 channels.
    - 2 (grayscale + alpha): composited over white, then repeated.
    - 3 (RGB): kept.
    - 4 (RGBA): composited over white, the colour of an empty slide, as ``prepare`` does: a gray, LA, RGB
      or RGBA image gives the same pixels (within rounding) whether it is prepared first or read directly.
      Palette images are not expanded here (``PILReader`` returns their indices): prepare them first.

    Intensities, decided once per image on all its channels (alpha included):

    - ``bool``: multiplied by 255.
    - ``uint16`` (16-bit): divided by 257, so 65535 becomes 255.
    - other integer dtypes: kept if the maximum is at most 255, else treated as 16-bit (divided by 257).
    - floating point: multiplied by 255 if the maximum is at most 1 (an image in [0, 1]); kept if the
      maximum is in (1, 255] (8-bit data cast to float: ``LoadImaged`` returns float32 by default);
      divided by 257 if the maximum is in (255, 65535] (a 16-bit PNG loaded as float32 by ``LoadImaged``).
      The [0, 1] rule means an 8-bit image whose brightest pixel is 0 or 1 is also scaled by 255.

    Raises:
        SPPNetError: (a ValueError) naming the image (``name``) and the shape, for an array that is not (C, H, W) with C
            in 1..4, or whose values are negative, not finite, or above 65535.
    """

    def __call__(self, img: NdarrayOrTensor, name: Hashable = "image") -> NdarrayOrTensor:
        key = name
        arr = convert_to_numpy(img)
        shape = tuple(arr.shape)
        if arr.ndim != 3 or not 1 <= shape[0] <= 4:
            raise SPPNetError(
                f"EnsureRGB: '{key}' has shape {shape}; expected a channel-first (C, H, W) image with C = 1 "
                "(gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)."
            )
        kept = arr[:1] if shape[0] <= 2 else arr[:3]
        multiplier, divisor = 1.0, 1.0
        if kept.dtype == np.bool_:
            multiplier = _MAX_8BIT
        else:
            if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
                raise SPPNetError(f"EnsureRGB: '{key}' with shape {shape} has unsupported dtype {arr.dtype}.")
            # Over all channels, alpha included: a full-scale alpha tells the scale of a dark image, as in prepare.
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > _MAX_16BIT:
                raise SPPNetError(
                    f"EnsureRGB: '{key}' with shape {shape} has values in [{lo:g}, {hi:g}]; expected finite "
                    "intensities in [0, 1], [0, 255] or [0, 65535] (apply EnsureRGBd before any normalisation)."
                )
            if kept.dtype == np.uint16 or hi > _MAX_8BIT:
                divisor = _MAX_16BIT / _MAX_8BIT  # 257: 65535 -> 255
            elif np.issubdtype(kept.dtype, np.floating) and hi <= 1.0:
                multiplier = _MAX_8BIT
        rgb = kept.astype(np.float32)
        if multiplier != 1.0:
            rgb *= np.float32(multiplier)
        if divisor != 1.0:
            rgb /= np.float32(divisor)
        if shape[0] in (2, 4):  # alpha, on the colour channels' scale
            alpha = np.clip(arr[-1:].astype(np.float32) * np.float32(multiplier / divisor / _MAX_8BIT), 0.0, 1.0)
            rgb = rgb * alpha + np.float32(_MAX_8BIT) * (1.0 - alpha)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        out, *_ = convert_to_dst_type(np.ascontiguousarray(rgb), img, dtype=np.float32)
        return out


class EnsureRGBd(MapTransform):
    """Dictionary wrapper of :class:`EnsureRGB`: each of ``keys`` becomes a (3, H, W) float32 RGB image in 0-255."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureRGB()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key], key)
        return d

"""Reading source images and masks in whatever form they come, writing PNG and JSON atomically.

Every reader raises :class:`~sppnet_monai.utils.SPPNetError` naming the file when it cannot be
used, so a caller can turn it into a warning and carry on with the rest of the dataset.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from sppnet_monai.utils import SPPNetError, atomic_path

__all__ = ["plain_intensities", "read_mask", "read_rgb", "to_rgb_uint8", "write_json", "write_png"]

TIFF_SUFFIXES = (".tif", ".tiff")
# PIL modes that are not plain intensities: convert them before taking the pixel values.
_PIL_COLOUR_MODES = {"P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def plain_intensities(img: Image.Image, colour_modes: dict[str, str] = _PIL_COLOUR_MODES) -> Image.Image:
    """``img`` in a mode whose pixel values are intensities (palette, CMYK, YCbCr... converted to RGB(A)).

    The bundle's ``PILReader(converter=...)`` and :func:`read_rgb` both read images through it.
    """
    return img.convert(colour_modes[img.mode]) if img.mode in colour_modes else img


def _decode(path: Path, colour_modes: dict[str, str]) -> np.ndarray:
    """Pixel values of ``path``, any shape and dtype.

    Pillow first (it decodes the LZW tifs of MoNuSeg without extra codecs), tifffile as the
    fallback for tifs Pillow cannot open (e.g. 16-bit RGB).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(plain_intensities(img, colour_modes))
    except Exception as pil_err:  # Pillow raises many types for broken files
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise SPPNetError(f"{path}: cannot read image ({pil_err})") from pil_err
    try:
        import tifffile

        return tifffile.imread(path)
    except Exception as tif_err:
        raise SPPNetError(f"{path}: cannot read image ({tif_err})") from tif_err


def _read_array(path: Path, colour_modes: dict[str, str]) -> np.ndarray:
    """Pixel values of ``path`` as ``(H, W)`` or ``(H, W, C)``, any dtype."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": failures are reported as errors
        array = _decode(path, colour_modes)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) tifs
    if array.size == 0:
        raise SPPNetError(f"{path}: cannot read image (no pixel data)")
    if array.ndim not in (2, 3):
        raise SPPNetError(f"{path}: expected a 2D image, got pixel array of shape {array.shape}")
    return array


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1|2|3|4)`` of any dtype -> ``(H, W, 3)`` uint8, by the bundle's own RGB rule.

    :class:`~sppnet_monai.transforms.EnsureRGB` decides the scale and composites alpha over white;
    this rounds its result, so a prepared image holds the pixels the bundle would read directly.
    """
    from sppnet_monai.transforms.image import EnsureRGB

    chw = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return np.moveaxis(np.round(EnsureRGB()(chw)).astype(np.uint8), 0, -1)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (see :func:`to_rgb_uint8` for the conversions)."""
    path = Path(path)
    array = _read_array(path, _PIL_COLOUR_MODES)
    try:
        return to_rgb_uint8(array)
    except ValueError as err:
        raise SPPNetError(f"{path}: {err}") from err


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as ``(H, W)`` or ``(H, W, C)`` pixel values, dtype as stored.

    Palette PNGs keep their palette indices: those are the labels.
    """
    return _read_array(Path(path), {"CMYK": "RGB", "YCbCr": "RGB"})


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``(H, W, 3)`` uint8 RGB or ``(H, W)`` uint8/uint16 as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")

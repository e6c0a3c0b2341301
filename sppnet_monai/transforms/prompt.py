"""Point-prompt dictionary transforms: sample SPPNet's single-point prompt, and turn clicks into channels.

Clicks are (x, y) = (column, row) pairs, as SAM expects, stored MONAI Label style in the data dict:
``d["foreground"] = [[x, y], ...]`` and ``d["background"] = [[x, y], ...]`` (an empty list: no click).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from sppnet_monai.clicks import click_pixels
from sppnet_monai.data.instances import binary_to_instances, is_binary_mask

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable
from monai.transforms.utils_pytorch_numpy_unification import concatenate
from monai.utils import convert_to_dst_type, convert_to_numpy
from monai.utils.misc import MAX_SEED

__all__ = ["AddClickGuidanceChannelsd", "CenterNeighborhoodPointSampled", "nucleus_center"]

_MODES = ("center", "random")


def nucleus_center(mask: np.ndarray) -> tuple[int, int]:
    """Centre M of one nucleus, as SPPNet defines it (paper, section 2.1, eq. 1).

    M is the first maximum, in row-major scan order, of the L1 (taxicab) distance from each pixel of
    ``mask`` to the nearest pixel outside it; pixels beyond the image border count as outside.

    Args:
        mask: (H, W) boolean mask of one nucleus, not empty.

    Returns:
        (x, y) = (column, row) of M.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("nucleus_center: the mask is empty.")
    r0, c0 = int(rows.min()), int(cols.min())
    # The bounding box padded by one outside pixel gives the same distances as the whole image
    # padded by one: the nearest outside pixel is never farther than the padding ring.
    crop = np.pad(np.asarray(mask[r0 : rows.max() + 1, c0 : cols.max() + 1], dtype=bool), 1)
    dist = ndimage.distance_transform_cdt(crop, metric="taxicab")[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)  # argmax: first maximum, row-major
    return int(col) + c0, int(row) + r0


def _instance_map(label: NdarrayOrTensor, key: Hashable) -> np.ndarray:
    """(1, H, W) or (H, W) label -> (H, W) int64 instance map; a bool, 0/1 or 0/255 label is binary."""
    lab = convert_to_numpy(label)
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 2:
        raise ValueError(
            f"CenterNeighborhoodPointSampled: '{key}' has shape {tuple(np.shape(label))}; expected a (1, H, W) "
            "or (H, W) label map."
        )
    if lab.dtype != np.bool_:
        if lab.size and float(lab.min()) < 0:
            raise ValueError(f"CenterNeighborhoodPointSampled: '{key}' has negative values; expected ids >= 0.")
        lab = np.rint(lab).astype(np.int64) if np.issubdtype(lab.dtype, np.floating) else lab.astype(np.int64)
    if is_binary_mask(lab):  # a binary mask: its 4-connected components are the instances
        return binary_to_instances(lab)
    return lab


class CenterNeighborhoodPointSampled(Randomizable, MapTransform):
    """Sample SPPNet's prompt: one positive click near the centre of a random nucleus, one negative click.

    Center neighborhood point sampling (Xu et al. 2023, section 2.1):

    1. pick one nucleus uniformly among the instance ids present in the label;
    2. its centre M is the first maximum, in row-major scan order, of the L1 distance transform of the
       nucleus mask (the image border counts as outside): see :func:`nucleus_center`;
    3. the positive click is drawn from the (2K+1) x (2K+1) neighbourhood of M with Gaussian weights
       ``exp(-(dx^2 + dy^2) / (2 sigma^2))``, normalised over the positions inside the nucleus (and the image);
    4. the negative click is drawn uniformly from the background pixels (label == 0).

    ``mode="random"`` draws the positive click uniformly inside the chosen nucleus instead (the paper's
    ablation without CNPS). Every call draws afresh from ``self.R``; :meth:`set_random_state` reproduces a
    sequence, and so does ``monai.utils.set_determinism(seed)`` before constructing the transform (the
    constructor seeds ``self.R`` from NumPy's global generator).

    Label (``label_key``): (1, H, W) or (H, W) instance map, 0 = background, nucleus ids > 0 (numpy, torch
    or MetaTensor; floats are rounded). A binary mask (bool, or values in {0, 1} or {0, 255}) is split
    into 4-connected components, which are then the instances, numbered 1..n in scan order of their first
    pixel (``instance_key`` holds that number). An instance map in which only nucleus 1 (or 255) is left
    is read the same way, which changes nothing unless that nucleus is in several pieces.

    Writes, as MONAI Label style lists of (x, y) = (column, row) int pairs:

    - ``d[foreground_key] = [[x, y]]``, or ``[]`` when the label has no nucleus;
    - ``d[background_key] = [[x, y]]``, or ``[]`` when the label has no background pixel;
    - ``d[instance_key]``: the chosen instance id (int), 0 when the label has no nucleus.

    Args:
        label_key: key of the label map.
        foreground_key: key for the positive click list.
        background_key: key for the negative click list.
        kernel_radius: K, the neighbourhood is (2K+1) x (2K+1); the paper uses 2.
        sigma: standard deviation of the Gaussian weights, in pixels.
        mode: ``"center"`` (CNPS) or ``"random"`` (uniform inside the nucleus).
        allow_missing_keys: do nothing, instead of raising KeyError, when ``label_key`` is missing.
        instance_key: key for the chosen instance id.
    """

    def __init__(
        self,
        label_key: str = "label",
        foreground_key: str = "foreground",
        background_key: str = "background",
        kernel_radius: int = 2,
        sigma: float = 1.0,
        mode: str = "center",
        allow_missing_keys: bool = False,
        instance_key: str = "prompt_instance",
    ) -> None:
        MapTransform.__init__(self, label_key, allow_missing_keys)
        if int(kernel_radius) != kernel_radius or kernel_radius < 0:
            raise ValueError(f"kernel_radius must be an integer >= 0, got {kernel_radius!r}.")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}.")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        self.label_key = label_key
        self.foreground_key = foreground_key
        self.background_key = background_key
        self.instance_key = instance_key
        self.kernel_radius = int(kernel_radius)
        self.sigma = float(sigma)
        self.mode = mode
        offsets = np.arange(-self.kernel_radius, self.kernel_radius + 1)
        self._dy, self._dx = (a.ravel() for a in np.meshgrid(offsets, offsets, indexing="ij"))
        self._weights = np.exp(-(self._dx**2 + self._dy**2) / (2.0 * self.sigma**2))
        self.set_random_state(seed=int(np.random.randint(MAX_SEED)))
        self._instance = 0
        self._foreground: list[list[int]] = []
        self._background: list[list[int]] = []

    def randomize(self, data: np.ndarray) -> None:
        """Draw the instance and both clicks from an (H, W) int instance map (see :func:`_instance_map`)."""
        ids = np.unique(data)
        ids = ids[ids > 0]
        self._instance, self._foreground = 0, []
        if ids.size:
            self._instance = int(ids[self.R.randint(ids.size)])
            self._foreground = [list(self._draw_positive(data == self._instance))]
        background = np.flatnonzero(data == 0)
        self._background = []
        if background.size:
            row, col = divmod(int(background[self.R.randint(background.size)]), data.shape[1])
            self._background = [[col, row]]

    def _draw_positive(self, mask: np.ndarray) -> tuple[int, int]:
        if self.mode == "random":
            rows, cols = np.nonzero(mask)
            i = self.R.randint(rows.size)
            return int(cols[i]), int(rows[i])
        cx, cy = nucleus_center(mask)
        xs, ys = cx + self._dx, cy + self._dy
        height, width = mask.shape
        valid = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        valid[valid] = mask[ys[valid], xs[valid]]
        weights = np.where(valid, self._weights, 0.0)  # M itself is always valid, so the sum is > 0
        i = self.R.choice(weights.size, p=weights / weights.sum())
        return int(xs[i]), int(ys[i])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(_instance_map(d[key], key))
            d[self.foreground_key] = [list(p) for p in self._foreground]
            d[self.background_key] = [list(p) for p in self._background]
            d[self.instance_key] = self._instance
        return d


class ClickKeysTransform(MapTransform):
    """Base of the transforms that read or write the ``foreground`` / ``background`` click lists of images ``keys``."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        foreground_key: str = "foreground",
        background_key: str = "background",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground_key = foreground_key
        self.background_key = background_key


class AddClickGuidanceChannelsd(ClickKeysTransform):
    """Append a positive and a negative click map to each image: (C, H, W) -> (C + 2, H, W).

    A click map is 0 everywhere and 1.0 at each click's pixel, the nearest pixel centre
    (:func:`sppnet_monai.clicks.click_pixels`); an empty or missing click list gives an all-zero map, which SPPNet
    reads as "no click" (SAM's padding point, label -1). Several positive clicks are several prompts
    whose masks are united; of several negative clicks the first in scan order is used (the rule of
    :mod:`sppnet_monai.clicks`, applied by ``SPPNet.decode_guidance``).

    Clicks are read from ``d[foreground_key]`` and ``d[background_key]`` as lists of (x, y) = (column, row)
    pairs: those written by :class:`CenterNeighborhoodPointSampled` or those of a MONAI Label request.
    The output keeps the image's type (numpy, torch or MetaTensor, with its metadata), dtype and device.
    Apply after intensity normalisation.

    Raises:
        SPPNetError: (a ValueError, one line) for a click outside the image, naming the click and the image
            size, or for a click list that is not a list of (x, y) pairs.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if len(img.shape) != 3:
                raise ValueError(
                    f"AddClickGuidanceChannelsd: '{key}' has shape {tuple(img.shape)}; expected (C, H, W)."
                )
            height, width = int(img.shape[-2]), int(img.shape[-1])
            maps = np.zeros((2, height, width), dtype=np.float32)
            for channel, click_key in enumerate((self.foreground_key, self.background_key)):
                clicks = d.get(click_key)
                clicks = None if clicks is None else convert_to_numpy(clicks)
                pixels = click_pixels(clicks, width, height, click_key, f"image '{key}'")
                maps[channel, pixels[:, 1], pixels[:, 0]] = 1.0
            maps_t, *_ = convert_to_dst_type(maps, img, dtype=img.dtype)
            d[key] = concatenate([img, maps_t], axis=0)
        return d

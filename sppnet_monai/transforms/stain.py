"""Random H&E stain perturbation in the haematoxylin-eosin-DAB colour space.

Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to
train distilled stain-invariant convolutional networks", IEEE TMI 2018. MONAI's pathology stain
transforms normalise stains (Macenko) but do not perturb them, hence this transform.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = ["RandHEDJitter", "RandHEDJitterd", "stained_pixels"]


def stained_pixels(rgb: NdarrayOrTensor, min_density: float, channel_dim: int) -> NdarrayOrTensor:
    """Which pixels of an RGB image (0-255) absorb light: optical density ``-log10(I / 255)`` above ``min_density``
    in some channel (Beer-Lambert; glass is near 0). ``channel_dim``: the RGB axis, dropped in the result."""
    # I < 255 * 10**-d  <=>  -log10(I / 255) > d, in the darkest channel.
    darkest = rgb.amin(dim=channel_dim) if hasattr(rgb, "amin") else np.min(rgb, axis=channel_dim)
    return darkest < 255.0 * 10.0 ** (-min_density)


class RandHEDJitter(RandomizableTransform):
    """Scale and shift each stain of a ``(3, H, W)`` RGB image (0-255) by random amounts, in HED space.

    Each of the haematoxylin, eosin and DAB concentrations ``s`` becomes ``s * a + b`` with
    ``a ~ U(1 - scale, 1 + scale)`` and ``b ~ U(-shift, shift)``; the result is clipped to 0-255.

    Args:
        scale: largest relative change of a stain's concentration.
        shift: largest offset of a stain's concentration, in optical density units (H&E tissue: about 0-1).
        prob: probability of perturbing an image.
    """

    def __init__(self, scale: float = 0.05, shift: float = 0.05, prob: float = 0.5) -> None:
        super().__init__(prob)
        self.scale, self.shift = scale, shift
        self._factors = np.ones(3)
        self._offsets = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._factors = self.R.uniform(1 - self.scale, 1 + self.scale, 3)
        self._offsets = self.R.uniform(-self.shift, self.shift, 3)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        # Beer-Lambert optical density and skimage's HED stain matrices; unlike skimage's rgb2hed, which
        # clips negative concentrations, this round trip is exact when the jitter is zero.
        rgb = np.moveaxis(np.clip(convert_to_numpy(img, dtype=np.float64), 0, 255), 0, -1)
        hed = (-np.log((rgb + 1.0) / 256.0) @ hed_from_rgb) * self._factors + self._offsets
        out = np.exp(-(hed @ rgb_from_hed)) * 256.0 - 1.0
        out = np.moveaxis(np.clip(out, 0, 255), -1, 0).astype(np.float32)
        result, *_ = convert_to_dst_type(out, img, dtype=img.dtype)
        return result


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of :class:`RandHEDJitter`: the same draw for every key."""

    def __init__(
        self, keys: KeysCollection = "image", scale: float = 0.05, shift: float = 0.05, prob: float = 0.5, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = RandHEDJitter(scale, shift, prob=1.0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandHEDJitterd":
        super().set_random_state(seed, state)
        self.jitter.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.jitter.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], randomize=False)
        return d

"""Training targets for the boundary head: nuclei mask, nucleus boundaries, and where boundaries are known."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.segmentation import find_boundaries

from sppnet_monai.data.instances import INSTANCE_SOURCE_KEY, SEPARATE_NUCLEI_SOURCES

__all__ = ["NucleiBoundaryTarget", "NucleiBoundaryTargetd"]


class NucleiBoundaryTarget(Transform):
    """Instance label map ``(1, H, W)`` -> targets ``(3, H, W)``: nuclei mask, boundaries, boundary weight.

    The boundary is every nucleus pixel next to another label (:func:`skimage.segmentation.find_boundaries`,
    ``mode="inner"``): between two touching nuclei, a line two pixels wide, one from each. The weight
    is 1 where the boundary target can be trusted, 0 elsewhere, so a loss learns boundaries only from
    images whose nuclei were outlined one by one.

    Args:
        label: ``(1, H, W)`` or ``(H, W)`` integer ids, 0 = background.
        boundaries_known: whether ids separate touching nuclei (outlines, not a binary mask's components).
    """

    def __call__(self, label: NdarrayOrTensor, boundaries_known: bool = True) -> NdarrayOrTensor:
        ids = convert_to_numpy(label)
        ids = ids[0] if ids.ndim == 3 and ids.shape[0] == 1 else ids
        if ids.ndim != 2:
            raise ValueError(f"NucleiBoundaryTarget expects a (1, H, W) instance label map, got shape {tuple(np.shape(label))}.")
        ids = np.rint(ids).astype(np.int64) if np.issubdtype(ids.dtype, np.floating) else ids.astype(np.int64)
        nuclei = ids > 0
        boundary = find_boundaries(ids, connectivity=1, mode="inner") & nuclei
        weight = np.full(ids.shape, float(boundaries_known), dtype=np.float32)
        targets = np.stack([nuclei, boundary]).astype(np.float32)
        out, *_ = convert_to_dst_type(np.concatenate([targets, weight[None]]), label, dtype=np.float32)
        return out


class NucleiBoundaryTargetd(MapTransform):
    """Dictionary wrapper of :class:`NucleiBoundaryTarget`; the entry's instance source (``prepare``'s
    datalist ``instances``: ``"xml"``, ``"connected_components"``, ...) says whether its boundaries are
    known (``SEPARATE_NUCLEI_SOURCES``); an entry without one counts as known.

    Args:
        keys: instance label maps ``(1, H, W)``, replaced by their ``(3, H, W)`` targets.
        source_key: the datalist key holding the instance source.
    """

    def __init__(
        self, keys: KeysCollection = "label", source_key: str = INSTANCE_SOURCE_KEY, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.target = NucleiBoundaryTarget()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        known = str(d.get(self.source_key, SEPARATE_NUCLEI_SOURCES[0])) in SEPARATE_NUCLEI_SOURCES
        for key in self.key_iterator(d):
            d[key] = self.target(d[key], known)
        return d

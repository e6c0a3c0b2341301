"""Training targets of the instance head: nuclei mask, a map separating touching nuclei, and where it is known."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage
from skimage.segmentation import find_boundaries

from sppnet_monai.data.instances import INSTANCE_SOURCE_KEY, SEPARATE_NUCLEI_SOURCES

from sppnet_monai.networks.sppnet import INSTANCE_HEADS

__all__ = ["NucleiInstanceTarget", "NucleiInstanceTargetd", "hover_maps", "normalised_distance"]


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32: each nucleus's Euclidean distance to the nearest pixel outside it (other nuclei
    included), divided by its own maximum, so 1 at every nucleus's centre and small at its border; 0 outside."""
    out = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # One pixel of margin so that the bounding box's edge counts as outside only where the image ends.
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = labels[padded] == index
        distance = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        out[padded][inside] = (distance[inside] / distance.max()).astype(np.float32)
    return out


def hover_maps(labels: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` float32: HoVer-Net's horizontal and vertical maps (Graham et al. 2019), each nucleus pixel's
    column and row offset from its nucleus's centre of mass, scaled so that each side of the centre spans 0..1 in
    size (-1 at the nucleus's left or top edge, +1 at its right or bottom edge); 0 outside nuclei. Where two
    nuclei touch, the maps jump from +1 to -1: the edge the post-processing finds. Each connected piece of a
    label counts as a nucleus of its own: reflection padding of a rotated or zoomed crop mirrors a nucleus at the
    border into a second piece with the same id."""
    out = np.zeros((2, *labels.shape), dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == index)
        for piece in range(1, count + 1):
            inside = pieces == piece
            rows, cols = np.nonzero(inside)
            for channel, offsets in enumerate((cols - cols.mean(), rows - rows.mean())):
                # Each side by its own extent, as HoVer-Net does, so an off-centre mass still spans -1..1.
                low, high = -offsets.min(), offsets.max()
                scaled = np.where(offsets < 0, offsets / max(low, 1e-6), offsets / max(high, 1e-6))
                out[channel][box][inside] = scaled.astype(np.float32)
    return out


class NucleiInstanceTarget(Transform):
    """Instance label map ``(1, H, W)`` -> targets ``(2 + K, H, W)``: nuclei mask, the K instance maps (K = 1, or 2
    for ``"hv"``), their weight; with a clicked position, ``(3 + K, H, W)``: then the nucleus under the click alone
    (the click head's target).

    The instance maps (what the instance head learns after its sigmoid, see ``SPPNet(instance_head=...)``) are:

    - ``"boundary"``: every nucleus pixel next to another label (:func:`skimage.segmentation.find_boundaries`,
      ``mode="inner"``): its contour, and between two touching nuclei a line two pixels wide;
    - ``"distance"``: :func:`normalised_distance`, 1 at each nucleus's centre, falling to its border, so
      touching nuclei are two hills with a valley between them;
    - ``"hv"``: :func:`hover_maps` mapped from -1..1 to 0..1 (0.5 outside nuclei), the sigmoid's range.

    The weight is 1 where the instance map can be trusted, 0 elsewhere, so a loss learns it only from
    images whose nuclei were outlined one by one.

    Args:
        kind: ``"boundary"``, ``"distance"`` or ``"hv"``.
    """

    def __init__(self, kind: str = "distance") -> None:
        if kind not in INSTANCE_HEADS:
            raise ValueError(f"kind must be one of {INSTANCE_HEADS}, got {kind!r}.")
        self.kind = kind

    def __call__(
        self, label: NdarrayOrTensor, separates_nuclei: bool = True, click: Sequence[int] | None = None, clicked: bool = False
    ) -> NdarrayOrTensor:
        """``label``: ``(1, H, W)`` or ``(H, W)`` integer ids, 0 = background; ``separates_nuclei``: whether its
        ids separate touching nuclei (outlines, not a binary mask's connected components); with ``clicked``,
        a fourth channel holds the nucleus under ``click`` ``(x, y)`` (empty for no click or a background click)."""
        ids = convert_to_numpy(label)
        ids = ids[0] if ids.ndim == 3 and ids.shape[0] == 1 else ids
        if ids.ndim != 2:
            raise ValueError(f"NucleiInstanceTarget expects a (1, H, W) instance label map, got shape {tuple(np.shape(label))}.")
        ids = np.rint(ids).astype(np.int64) if np.issubdtype(ids.dtype, np.floating) else ids.astype(np.int64)
        nuclei = ids > 0
        if self.kind == "boundary":
            instance_maps = [(find_boundaries(ids, connectivity=1, mode="inner") & nuclei).astype(np.float32)]
        elif self.kind == "hv":
            instance_maps = list((hover_maps(ids) + 1) / 2)
        else:
            instance_maps = [normalised_distance(ids)]
        weight = np.full(ids.shape, float(separates_nuclei), dtype=np.float32)
        channels = [nuclei.astype(np.float32), *instance_maps, weight]
        if clicked:
            clicked_id = ids[int(click[1]), int(click[0])] if click is not None else 0
            channels.append(((ids == clicked_id) & nuclei).astype(np.float32))
        targets = np.stack(channels)
        out, *_ = convert_to_dst_type(targets, label, dtype=np.float32)
        return out


class NucleiInstanceTargetd(MapTransform):
    """Dictionary wrapper of :class:`NucleiInstanceTarget`; the entry's instance source (``prepare``'s
    datalist ``instances``: ``"xml"``, ``"connected_components"``, ...) says whether its ids separate
    touching nuclei (``SEPARATE_NUCLEI_SOURCES``); an entry without one counts as separating them.

    Args:
        keys: instance label maps ``(1, H, W)``, replaced by their ``(2 + K, H, W)`` targets (``(3 + K, H, W)`` with
            ``click_key``; K = 2 for ``"hv"``, else 1).
        kind: ``"boundary"``, ``"distance"`` or ``"hv"``.
        source_key: the datalist key holding the instance source.
        click_key: the positive click list (``[[x, y]]``, as :class:`CenterNeighborhoodPointSampled` writes it) whose
            nucleus is the click head's target; None: no such target.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        kind: str = "distance",
        source_key: str = INSTANCE_SOURCE_KEY,
        allow_missing_keys: bool = False,
        click_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.click_key = click_key
        self.target = NucleiInstanceTarget(kind)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        separates = str(d.get(self.source_key, SEPARATE_NUCLEI_SOURCES[0])) in SEPARATE_NUCLEI_SOURCES
        clicks = list(d.get(self.click_key) or []) if self.click_key else []
        for key in self.key_iterator(d):
            d[key] = self.target(d[key], separates, clicks[0] if clicks else None, clicked=self.click_key is not None)
        return d

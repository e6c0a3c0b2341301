"""From a nuclei mask to one label per nucleus: watershed, seeded by distance peaks or by the instance head.

Touching nuclei form one connected blob in the mask. Without more information, each nucleus is
taken as roughly convex, so the distance to the background peaks once inside each of them and dips
at the neck where they touch: watershed on the negated distance, seeded at its peaks, cuts the
blob at those necks (:func:`instances_from_semantic`). A network with an instance head draws the
cut itself (:func:`instances_from_head`): the mask minus its predicted contours (DCAN, Chen et al.
CVPR 2016; CDNet, He et al. ICCV 2021), the top of its predicted per-nucleus distance map (Naylor
et al., IEEE TMI 2019), or the mask minus the edges of its horizontal and vertical maps (HoVer-Net,
Graham et al., MedIA 2019), leaves one core per nucleus, which seeds the watershed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import feature, morphology, segmentation

from sppnet_monai.data.instances import binary_to_instances, relabel_consecutive
from sppnet_monai.networks.sppnet import INSTANCE_HEAD_CHANNELS
from sppnet_monai.utils import SPPNetError

__all__ = ["hover_edges", "instances_from_head", "instances_from_semantic"]

# Scale of the Gaussian derivative that reads edges off HoVer-Net maps: one pixel, the width of the jump
# between two touching nuclei in the target, wide enough to average a network's pixel noise.
HOVER_EDGE_SIGMA = 1.0


def _seeds(
    distance: np.ndarray, components: np.ndarray, min_distance: int, footprint_size: int | None, split_depth: float
) -> np.ndarray:
    """``(H, W)`` int32 watershed markers ``1..K``, one per nucleus centre found in ``distance``.

    Centres are the local maxima of ``distance`` (:func:`skimage.feature.peak_local_max`, at
    least ``min_distance`` apart) within each connected component. Maxima joined by a ridge that
    never dips more than ``split_depth`` below the lower one are one centre: they are grouped by
    the h-maxima transform (the regional maxima of the morphological reconstruction of
    ``distance - split_depth`` under ``distance``), because the ridge of an elongated nucleus is
    nearly flat and its pixel ripples would otherwise cut it into several nuclei.
    """
    footprint = None if footprint_size is None else np.ones((footprint_size, footprint_size), dtype=bool)
    peaks = feature.peak_local_max(
        distance,
        min_distance=min_distance,
        footprint=footprint,
        labels=components,
        # The default drops peaks within min_distance of the image border, which would leave
        # nuclei cut by the border (every tile edge) without a marker, hence without a label.
        exclude_border=False,
    )
    if split_depth > 0:
        plateaus = _h_maxima(distance, components > 0, peaks, split_depth)
    else:  # only touching peaks (a plateau of equal distance) are one centre
        plateaus = np.zeros(distance.shape, dtype=bool)
        plateaus[tuple(peaks.T)] = True
    groups, n_groups = ndimage.label(plateaus, structure=np.ones((3, 3), dtype=bool))
    # A group is a centre only if peak_local_max kept one of its peaks (min_distance applies).
    kept = np.zeros(n_groups + 1, dtype=bool)
    kept[groups[tuple(peaks.T)]] = True
    kept[0] = False
    # A group is 8-connected but components are 4-connected: split a group that touches two
    # components diagonally, so that one marker never floods two separate components.
    pairs = np.where(kept[groups], groups.astype(np.int64) * (int(components.max()) + 1) + components, 0)
    return relabel_consecutive(pairs, np.int32)


def _h_maxima(distance: np.ndarray, mask: np.ndarray, peaks: np.ndarray, depth: float) -> np.ndarray:
    """``(H, W)`` bool: the regional maxima of the reconstruction of ``distance - depth`` under ``distance``,
    where they matter.

    Blobs (8-connected, as the reconstruction floods) do not exchange values: between them lies background,
    where the reconstruction is capped by ``distance`` = 0. So it is computed blob by blob on each blob's box
    with a ring of background: skimage sorts every pixel of the image it is given, which over a slide tile's
    context took a third of the network's time. A blob with a single peak needs none: that peak is its one
    centre whatever the plateau around it. The nuclei are those of the whole-image computation up to the
    watershed's ties (its queue holds the markers of every blob), which can move a few pixels between
    touching nuclei.
    """
    plateaus = np.zeros(distance.shape, dtype=bool)
    blobs, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    peak_blobs = blobs[tuple(peaks.T)]
    counts = np.bincount(peak_blobs, minlength=int(blobs.max()) + 1)
    single = counts[peak_blobs] == 1
    plateaus[tuple(peaks[single].T)] = True
    boxes = ndimage.find_objects(blobs)
    for blob in np.flatnonzero(counts > 1):
        rows, cols = boxes[blob - 1]
        box = (
            slice(max(rows.start - 1, 0), rows.stop + 1),  # one pixel of background around it, as in the image
            slice(max(cols.start - 1, 0), cols.stop + 1),
        )
        inside = blobs[box] == blob
        local = np.where(inside, distance[box], 0.0)
        flattened = morphology.reconstruction(local - depth, local, method="dilation")
        plateaus[box] |= morphology.local_maxima(flattened, connectivity=2, allow_borders=True) & inside
    return plateaus


def instances_from_semantic(
    mask: np.ndarray,
    min_distance: int = 3,
    footprint_size: int | None = None,
    min_size: int = 10,
    split_depth: float = 0.5,
) -> np.ndarray:
    """Split a binary nuclei mask into nuclei by distance-transform watershed.

    Defaults suit 40x H&E (nuclei of about 5-15 px radius); the bundle config sets them
    (``instance_postprocess``).

    Args:
        mask: ``(H, W)`` nuclei mask: bool, or numbers where non-zero is nucleus.
        min_distance: smallest distance in pixels (Chebyshev) between two nucleus centres; two
            touching nuclei whose centres are closer stay one. Lower splits more; the smallest
            nuclei (radius ~5, centres >= ~10 apart when touching) are safe with the default.
        footprint_size: side in pixels of the square window in which a centre must be the
            largest distance; ``None`` uses ``2 * min_distance + 1``. Larger merges the several
            shallow maxima of irregular nuclei.
        min_size: nuclei (after the split) with fewer pixels are dropped, as noise.
        split_depth: in pixels; two centres are kept apart only if the distance to the
            background dips by more than this between them (the ``h`` of h-maxima). 0 keeps
            every local maximum and cuts elongated nuclei into pieces; above 1 merges strongly
            overlapping small nuclei. The default splits two touching disks of radius 4-15 px
            even when they overlap by 30% of their diameter and keeps ellipses of semi-axes up
            to 25x8 px whole (thinner ones, 3:1 and up, may be cut in two); on synthetic H&E
            masks (``data.synthetic``) it gave the best PQ among 0-2, with AJI within 0.03 of
            the best (at 0, which oversplits: AJI forgives that more than a merge).

    Returns:
        ``(H, W)`` int32 label map, 0 = background, nuclei numbered ``1..N``; all zeros for an
        empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise SPPNetError(f"expected a (H, W) nuclei mask, got shape {mask.shape}")
    if min_distance < 1:
        raise SPPNetError(f"min_distance must be at least 1 pixel, got {min_distance}")
    if split_depth < 0:
        raise SPPNetError(f"split_depth cannot be negative, got {split_depth}")
    if footprint_size is not None and footprint_size < 1:
        raise SPPNetError(f"footprint_size must be at least 1 pixel, got {footprint_size}")
    mask = mask != 0
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    # 4-connected, as for ground-truth masks: a one-pixel line of background keeps two nuclei apart.
    components = binary_to_instances(mask)
    distance = ndimage.distance_transform_edt(mask)
    markers = _seeds(distance, components, min_distance, footprint_size, split_depth)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    # peak_local_max gives every component at least one peak: no orphans expected here.
    return _finish(labels, mask, min_size)


def hover_edges(maps: np.ndarray, sigma: float = HOVER_EDGE_SIGMA) -> np.ndarray:
    """``(H, W)`` float32 in 0..1, how steeply HoVer-Net's maps fall: a nucleus's horizontal map rises from -1 to
    +1 left to right and its vertical map top to bottom, so each falls only across a nucleus's edge (by 2 in a
    pixel where two nuclei touch). The fall per pixel along its own axis (a 1-D Gaussian derivative), the larger of
    the two, clipped to 0..1: a boundary map for :func:`instances_from_head`.

    HoVer-Net min-max normalises a 21x21 Sobel response per image instead; an absolute slope does not depend on
    what else is in the image.

    Args:
        maps: ``(2, H, W)`` the head's horizontal and vertical maps after the sigmoid (0..1, 0.5 = centre line).
        sigma: the Gaussian's standard deviation, pixels.
    """
    horizontal, vertical = 2 * np.asarray(maps, dtype=np.float32) - 1
    # Along each map's own axis only: smoothing across it would blur a nucleus's edge into the background at
    # its corners and join touching nuclei's cores there.
    fall_x = -ndimage.gaussian_filter1d(horizontal, sigma, axis=1, order=1)
    fall_y = -ndimage.gaussian_filter1d(vertical, sigma, axis=0, order=1)
    return np.clip(np.maximum(fall_x, fall_y), 0.0, 1.0).astype(np.float32)


def instances_from_head(
    mask: np.ndarray,
    head: np.ndarray,
    kind: str,
    core_threshold: float = 0.5,
    min_core_size: int = 4,
    min_size: int = 10,
) -> np.ndarray:
    """Split a nuclei mask into nuclei with the map an instance head predicted (``SPPNet(instance_head=kind)``).

    Cores, one per nucleus, are the 4-connected components of ``mask`` where the map says "inside":
    ``"boundary"`` probability below ``core_threshold``, ``"distance"`` (normalised distance to the
    nucleus border, 1 at its centre) above it, or ``"hv"`` maps whose :func:`hover_edges` are below it.
    Each core seeds a watershed inside ``mask`` over the boundary map (or edges), or over the negated
    distance map, so the rest of each nucleus joins its core and touching nuclei part along the ridge
    (or valley) between them.

    Args:
        mask: ``(H, W)`` nuclei mask, non-zero = nucleus.
        head: the instance head's maps after the sigmoid: ``(H, W)``, or ``(2, H, W)`` for ``"hv"``.
        kind: ``"boundary"``, ``"distance"`` or ``"hv"``.
        core_threshold: where the map separates core from rim.
        min_core_size: cores with fewer pixels are dropped (noise would otherwise split a nucleus); their
            pixels join a neighbouring nucleus.
        min_size: nuclei (after the split) with fewer pixels are dropped.

    Returns:
        ``(H, W)`` int32 label map, 0 = background, nuclei numbered ``1..N``.
    """
    mask, head = np.asarray(mask) != 0, np.asarray(head, dtype=np.float32)
    maps = INSTANCE_HEAD_CHANNELS.get(kind)
    if maps is None:
        raise SPPNetError(f"kind must be one of {tuple(INSTANCE_HEAD_CHANNELS)}, got {kind!r}")
    expected = mask.shape if maps == 1 else (maps, *mask.shape)
    if mask.ndim != 2 or head.shape != expected:
        raise SPPNetError(f"expected a (H, W) mask and instance maps of shape {expected} for {kind!r}, got {mask.shape} and {head.shape}")
    if not 0 < core_threshold < 1:
        raise SPPNetError(f"core_threshold must be between 0 and 1, got {core_threshold}")
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    if kind == "hv":
        head, kind = hover_edges(head), "boundary"
    inside, energy = (head < core_threshold, head) if kind == "boundary" else (head > core_threshold, -head)
    cores = _drop_small(binary_to_instances(mask & inside), min_core_size)
    labels = segmentation.watershed(energy, cores, mask=mask)
    return _finish(labels, mask, min_size)


def _finish(labels: np.ndarray, mask: np.ndarray, min_size: int) -> np.ndarray:
    """Final label map: mask pixels no seed reached become nuclei of their own, small nuclei are dropped."""
    # A blob without a seed (all boundary, say) is kept as its own nucleus instead of silently dropped.
    orphans, _ = ndimage.label(mask & (labels == 0))
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return relabel_consecutive(_drop_small(labels, min_size), np.int32)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with every label of fewer than ``min_size`` pixels set to 0, in place.

    By label, not by connected component, and without skimage's remove_small_objects (its size
    argument changed meaning in 0.26).
    """
    too_small = np.bincount(labels.ravel()) < min_size
    too_small[0] = False
    labels[too_small[labels]] = 0
    return labels

"""Instance label maps: from binary masks, from stored instance maps, and their invariants.

An instance label map is ``(H, W)`` uint16, 0 = background, nuclei numbered ``1..N``.
"""

from __future__ import annotations

import numpy as np
from skimage import measure, segmentation

__all__ = [
    "MAX_INSTANCES",
    "binary_to_instances",
    "count_instances",
    "instances_from_mask",
    "is_binary_mask",
    "relabel_consecutive",
]

MAX_INSTANCES = np.iinfo(np.uint16).max

# How a label map was obtained; recorded in the datalist under "instances".
FROM_XML = "xml"
FROM_CONNECTED_COMPONENTS = "connected_components"
FROM_INSTANCE_MAP = "instance_map"
FROM_SYNTHESIS = "synthetic"
# Sources whose ids separate touching nuclei; a binary mask's components merge them.
SEPARATE_NUCLEI_SOURCES = (FROM_XML, FROM_INSTANCE_MAP, FROM_SYNTHESIS)
INSTANCE_SOURCE_KEY = "instances"


def is_binary_mask(mask: np.ndarray) -> bool:
    """True if ``(H, W)`` ``mask`` only holds 0 and one foreground value (1 or 255) or bools."""
    values = np.unique(mask)
    return mask.dtype == bool or set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}


def relabel_consecutive(labels: np.ndarray, dtype: np.dtype = np.uint16) -> np.ndarray:
    """``(H, W)`` integer labels with arbitrary ids -> ids ``1..N`` of ``dtype``, keeping their order (0 stays 0).

    Raises ValueError for a map that is not integer (or bool), holds negative ids, or has more
    instances than ``dtype`` can hold.
    """
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"an instance label map needs integer ids, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("an instance label map cannot hold negative ids")
    relabelled, _, _ = segmentation.relabel_sequential(labels.astype(np.int64, copy=False))
    if relabelled.max(initial=0) > np.iinfo(dtype).max:
        raise ValueError(f"{int(relabelled.max())} instances do not fit a {np.dtype(dtype).name} label map")
    return relabelled.astype(dtype, copy=False)


def binary_to_instances(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` binary mask (non-zero = nucleus) -> int64 instances: its 4-connected components, numbered in scan order.

    4-connectivity, so that a one-pixel background line drawn between touching nuclei keeps them apart.
    """
    return measure.label(np.asarray(mask) != 0, connectivity=1).astype(np.int64, copy=False)


def _colours_to_ids(mask: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` colour-coded instances -> ``(H, W)`` int64 ids, black = 0."""
    flat = mask.reshape(-1, mask.shape[-1]).astype(np.int64)
    colours, ids = np.unique(flat, axis=0, return_inverse=True)
    ids = ids.reshape(mask.shape[:2])
    black = np.flatnonzero(~colours.any(axis=1))
    if black.size:  # black keeps id 0, every other colour shifts up to stay non-zero
        ids = np.where(ids == black[0], 0, ids + 1)
    else:
        ids = ids + 1
    return ids


def instances_from_mask(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """A mask as read from disk -> (``(H, W)`` uint16 instance map, how it was obtained).

    A binary mask becomes instances by connected components (4-connectivity, so that a
    one-pixel background line drawn between touching nuclei keeps them apart); anything else is
    taken as an instance map already (grey-level ids, or one colour per instance).
    Raises ValueError for masks that are neither (e.g. fractional values).
    """
    if mask.ndim == 3:
        if mask.shape[-1] in (2, 4):  # drop alpha
            mask = mask[..., :-1]
        mask = mask[..., 0] if (mask == mask[..., :1]).all() else _colours_to_ids(mask)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.array_equal(mask, np.round(mask)) or mask.min() < 0:
            raise ValueError("mask has fractional or negative values: neither binary nor instance ids")
        mask = mask.astype(np.int64)
    if np.issubdtype(mask.dtype, np.signedinteger) and mask.min() < 0:
        raise ValueError("mask has negative values: neither binary nor instance ids")
    if is_binary_mask(mask):
        return relabel_consecutive(binary_to_instances(mask)), FROM_CONNECTED_COMPONENTS
    return relabel_consecutive(mask), FROM_INSTANCE_MAP


def count_instances(labels: np.ndarray) -> int:
    """Number of distinct non-zero ids in ``labels``."""
    return int(np.count_nonzero(np.unique(labels)))

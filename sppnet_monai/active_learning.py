"""Which patch to label next: tissue patches of an image, chosen at random or where the model is least sure.

MONAI Label's *Next Sample* (QuPath) asks for a ``patch_size`` rectangle of an image; the answer must lie on
tissue (not glass) and not on a patch that already has a final label. Candidates are the cells of a grid of
``patch_size`` over the image (so that two answers never overlap by chance); a cell is tissue when at least
:data:`MIN_TISSUE` of its pixels are (:func:`tissue_mask`, read at a reduced level of a slide), and it is
labelled when a labelled box covers more than :data:`MAX_LABELLED_OVERLAP` of it.

Uncertainty (:func:`mean_entropy`): the mean binary entropy of the model's nuclei probability over a
window at the candidate's centre, at native pixels; the highest is the patch the model is least sure of.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from sppnet_monai.transforms.stain import stained_pixels

__all__ = [
    "MAX_LABELLED_OVERLAP",
    "MIN_TISSUE",
    "Box",
    "candidate_patches",
    "centre_window",
    "least_sure",
    "mean_entropy",
    "overlap_fraction",
    "tissue_mask",
]

Box = tuple[int, int, int, int]  # (x, y, width, height) in level-0 pixels

# Optical density above which a pixel absorbs light (tissue); glass and background transmit nearly all of it.
# The threshold of inference.json's min_stain_density, the windows of glass that slides skip.
TISSUE_OPTICAL_DENSITY = 0.15
MIN_TISSUE = 0.5
MAX_LABELLED_OVERLAP = 0.1


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` or ``(3, H, W)`` uint8 RGB -> ``(H, W)`` bool: the stained pixels
    (:func:`sppnet_monai.transforms.stain.stained_pixels` at :data:`TISSUE_OPTICAL_DENSITY`)."""
    rgb = np.asarray(rgb)
    channels_first = rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[-1] != 3
    return stained_pixels(rgb[:3] if channels_first else rgb[..., :3], TISSUE_OPTICAL_DENSITY, channel_dim=0 if channels_first else -1)


def overlap_fraction(cell: Box, box: Box) -> float:
    """The share of ``cell``'s area that ``box`` covers."""
    x0, y0 = max(cell[0], box[0]), max(cell[1], box[1])
    x1, y1 = min(cell[0] + cell[2], box[0] + box[2]), min(cell[1] + cell[3], box[1] + box[3])
    return max(0, x1 - x0) * max(0, y1 - y0) / float(cell[2] * cell[3])


def candidate_patches(
    size: tuple[int, int],
    patch_size: tuple[int, int],
    tissue_share: Callable[[Box], float],
    labelled: Iterable[Box] = (),
) -> list[Box]:
    """The grid cells of ``patch_size`` ``(w, h)`` over an image of ``size`` ``(W, H)`` that are tissue and unlabelled.

    A patch larger than the image is clipped to it; the last cell of a row or column lies flush with the
    image's border. ``tissue_share(box)`` gives the share of tissue pixels of a box (read at any level).
    """
    width, height = size
    patch_w, patch_h = min(patch_size[0], width), min(patch_size[1], height)
    if patch_w <= 0 or patch_h <= 0:
        raise ValueError(f"patch_size must be positive, got {tuple(patch_size)}")
    labelled = list(labelled)

    def starts(length: int, step: int) -> list[int]:
        return sorted({*range(0, length - step + 1, step), length - step})

    cells = [(x, y, patch_w, patch_h) for y in starts(height, patch_h) for x in starts(width, patch_w)]
    cells = [c for c in cells if all(overlap_fraction(c, box) <= MAX_LABELLED_OVERLAP for box in labelled)]
    return [c for c in cells if tissue_share(c) >= MIN_TISSUE]


def mean_entropy(probability: torch.Tensor | np.ndarray) -> float:
    """Mean binary entropy (bits) of a nuclei probability map: 0 where the model is sure, 1 at p = 0.5."""
    p = torch.as_tensor(probability, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    return float((-(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))).mean())


def centre_window(box: Box, window: int, size: tuple[int, int]) -> Box:
    """The ``window`` square at ``box``'s centre, moved inside an image of ``size`` ``(W, H)`` (clipped if larger)."""
    width, height = size
    w, h = min(window, width), min(window, height)
    x = int(np.clip(box[0] + box[2] // 2 - w // 2, 0, width - w))
    y = int(np.clip(box[1] + box[3] // 2 - h // 2, 0, height - h))
    return x, y, w, h


def least_sure(candidates: Sequence[Box], uncertainty: Callable[[Box], float]) -> tuple[Box, list[float]]:
    """The candidate of highest ``uncertainty``, and every candidate's score (in order)."""
    if not candidates:
        raise ValueError("no candidate patch")
    scores = [float(uncertainty(box)) for box in candidates]
    return candidates[int(np.argmax(scores))], scores

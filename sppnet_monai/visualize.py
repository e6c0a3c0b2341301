"""Pictures of a prediction: image, clicks, predicted and ground-truth nuclei outlines."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from skimage.segmentation import find_boundaries

from sppnet_monai.networks.sppnet import denormalize_rgb

__all__ = ["prompt_overlay"]

PREDICTION_RGB = (255, 230, 0)  # yellow outline
GROUND_TRUTH_RGB = (0, 200, 255)  # cyan outline
POSITIVE_RGB = (0, 255, 0)
NEGATIVE_RGB = (255, 0, 0)


def _mark(canvas: np.ndarray, click_map: np.ndarray, colour: Sequence[int], radius: int) -> None:
    if click_map.max() <= 0:
        return
    row, col = np.unravel_index(np.argmax(click_map), click_map.shape)
    canvas[max(row - radius, 0) : row + radius + 1, max(col - radius, 0) : col + radius + 1] = colour


def prompt_overlay(
    image: np.ndarray,
    prediction: Optional[np.ndarray],
    ground_truth: Optional[np.ndarray],
) -> np.ndarray:
    """RGB picture ``(H, W, 3)`` uint8 of one sample.

    Args:
        image: ``(5, H, W)`` network input: SAM-normalised RGB, positive and negative click maps.
        prediction, ground_truth: ``(H, W)`` or ``(1, H, W)`` masks (non-zero = nucleus), or None.
    """
    rgb = denormalize_rgb(torch.as_tensor(np.asarray(image[:3], dtype=np.float32))).numpy()
    canvas = np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()
    for mask, colour in ((ground_truth, GROUND_TRUTH_RGB), (prediction, PREDICTION_RGB)):
        if mask is not None:
            canvas[find_boundaries(np.squeeze(mask) > 0, mode="inner")] = colour
    radius = max(1, min(canvas.shape[:2]) // 128)
    _mark(canvas, image[3], POSITIVE_RGB, radius)
    _mark(canvas, image[4], NEGATIVE_RGB, radius)
    return canvas

"""Training loss of the nuclei mask, and of the boundary head where boundaries are known."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

__all__ = ["MaskBoundaryLoss"]


class MaskBoundaryLoss(nn.Module):
    """Loss of a network predicting nuclei (channel 0) and optionally their boundaries (channel 1).

    - prediction ``(B, 1, H, W)`` logits with target ``(B, 1, H, W)`` or ``(B, 3, H, W)``: the mask loss;
    - prediction ``(B, 2, H, W)`` with target ``(B, 3, H, W)`` (nuclei, boundary, weight; see
      :class:`~sppnet_monai.transforms.NucleiBoundaryTarget`): mask loss + ``boundary_weight`` x
      (Dice + binary cross-entropy of the boundary, both counted only where the weight is 1).

    Args:
        mask_loss: ``"dice"`` (MONAI's ``DiceLoss``) or ``"dice_ce"`` (``DiceCELoss``: Dice + cross-entropy).
        boundary_weight: weight of the boundary term.
    """

    def __init__(self, mask_loss: str = "dice", boundary_weight: float = 1.0) -> None:
        super().__init__()
        losses = {"dice": lambda: DiceLoss(sigmoid=True), "dice_ce": lambda: DiceCELoss(sigmoid=True)}
        if mask_loss not in losses:
            raise ValueError(f"mask_loss must be one of {sorted(losses)}, got {mask_loss!r}.")
        self.mask_loss = losses[mask_loss]()
        self.boundary_dice = DiceLoss(sigmoid=False)
        self.boundary_weight = boundary_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mask_loss(pred[:, :1], target[:, :1])
        if pred.shape[1] == 1:
            return loss
        if pred.shape[1] != 2 or target.shape[1] != 3:
            raise ValueError(f"expected predictions (B, 2, H, W) and targets (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}.")
        logits, boundary, weight = pred[:, 1:2].float(), target[:, 1:2], target[:, 2:3]
        # Images without known boundaries (weight 0) contribute nothing: masked Dice is 0/0 -> 0 by
        # DiceLoss's smoothing, masked cross-entropy has no pixels.
        dice = self.boundary_dice(torch.sigmoid(logits) * weight, boundary * weight)
        bce = (F.binary_cross_entropy_with_logits(logits, boundary, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)
        return loss + self.boundary_weight * (dice + bce)

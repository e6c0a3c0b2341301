"""Training loss of the nuclei mask, and of the instance head where instances are known."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

__all__ = ["MaskInstanceLoss"]


class MaskInstanceLoss(nn.Module):
    """Loss of a network predicting nuclei (channel 0) and optionally an instance map (channel 1).

    - prediction ``(B, 1, H, W)`` logits with target ``(B, 1, H, W)`` or ``(B, 3, H, W)``: the mask loss;
    - prediction ``(B, 2, H, W)`` with target ``(B, 3, H, W)`` (nuclei, instance map in [0, 1], weight;
      see :class:`~sppnet_monai.transforms.NucleiInstanceTarget`): mask loss + ``instance_weight`` x
      (soft Dice + binary cross-entropy of the instance map, both counted only where the weight is 1;
      cross-entropy takes the soft targets of a distance map as they are).

    Args:
        mask_loss: ``"dice"`` (MONAI's ``DiceLoss``) or ``"dice_ce"`` (``DiceCELoss``: Dice + cross-entropy).
        instance_weight: weight of the instance term.
    """

    def __init__(self, mask_loss: str = "dice", instance_weight: float = 1.0) -> None:
        super().__init__()
        losses = {"dice": lambda: DiceLoss(sigmoid=True), "dice_ce": lambda: DiceCELoss(sigmoid=True)}
        if mask_loss not in losses:
            raise ValueError(f"mask_loss must be one of {sorted(losses)}, got {mask_loss!r}.")
        self.mask_loss = losses[mask_loss]()
        self.instance_dice = DiceLoss(sigmoid=False)
        self.instance_weight = instance_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mask_loss(pred[:, :1], target[:, :1])
        if pred.shape[1] == 1:
            return loss
        if pred.shape[1] != 2 or target.shape[1] != 3:
            raise ValueError(f"expected predictions (B, 2, H, W) and targets (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}.")
        logits, instance_map, weight = pred[:, 1:2].float(), target[:, 1:2], target[:, 2:3]
        # Images without known instances (weight 0) contribute nothing: masked Dice is 0/0 -> 0 by
        # DiceLoss's smoothing, masked cross-entropy has no pixels.
        dice = self.instance_dice(torch.sigmoid(logits) * weight, instance_map * weight)
        bce = (F.binary_cross_entropy_with_logits(logits, instance_map, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)
        return loss + self.instance_weight * (dice + bce)

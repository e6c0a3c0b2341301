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
      cross-entropy takes the soft targets of a distance map as they are);
    - with ``clicked_channel``, that prediction channel against the target's fourth channel (the nucleus
      under the positive click), Dice + cross-entropy times ``click_weight``, on every image: the component
      of a binary mask under a click is one nucleus far more often than a clump, and the outlined images
      alone were too few (11 of MoNuSeg's 24 training images: after 30 epochs the head returned nothing,
      clicked-nucleus Dice 0.0002 on validation).

    Args:
        mask_loss: ``"dice"`` (MONAI's ``DiceLoss``) or ``"dice_ce"`` (``DiceCELoss``: Dice + cross-entropy).
        instance_weight: weight of the instance term.
        clicked_channel: the click head's output channel (``sppnet_monai.networks.clicked_channel``), None without one.
        click_weight: weight of the click term.
    """

    def __init__(self, mask_loss: str = "dice", instance_weight: float = 1.0, clicked_channel: int | None = None, click_weight: float = 1.0) -> None:
        super().__init__()
        losses = {"dice": lambda: DiceLoss(sigmoid=True), "dice_ce": lambda: DiceCELoss(sigmoid=True)}
        if mask_loss not in losses:
            raise ValueError(f"mask_loss must be one of {sorted(losses)}, got {mask_loss!r}.")
        self.mask_loss = losses[mask_loss]()
        self.instance_dice = DiceLoss(sigmoid=False)
        self.instance_weight = instance_weight
        self.clicked_channel = clicked_channel
        self.click_weight = click_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mask_loss(pred[:, :1], target[:, :1])
        clicked = self.clicked_channel is not None
        if pred.shape[1] == 1 and not clicked:
            return loss
        channels = 1 + int(clicked)
        if pred.shape[1] not in (channels, channels + 1) or target.shape[1] != 3 + int(clicked):
            raise ValueError(
                f"expected predictions (B, {channels} or {channels + 1}, H, W) and targets (B, {3 + int(clicked)}, H, W), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        weight = target[:, 2:3]
        if pred.shape[1] == channels + 1:  # an instance head
            loss = loss + self.instance_weight * self._weighted(pred[:, 1:2], target[:, 1:2], weight)
        if clicked:
            clicked_logits = pred[:, self.clicked_channel : self.clicked_channel + 1]
            loss = loss + self.click_weight * self._weighted(clicked_logits, target[:, 3:4], torch.ones_like(weight))
        return loss

    def _weighted(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Soft Dice + binary cross-entropy of ``logits`` against ``target`` where ``weight`` is 1."""
        logits = logits.float()
        # Images without known instances (weight 0) contribute nothing: masked Dice is 0/0 -> 0 by
        # DiceLoss's smoothing, masked cross-entropy has no pixels.
        dice = self.instance_dice(torch.sigmoid(logits) * weight, target * weight)
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)
        return dice + bce

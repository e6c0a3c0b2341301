"""Training loss of the nuclei mask, and of the instance head where instances are known."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

from sppnet_monai.networks.sppnet import instance_channels

__all__ = ["MaskInstanceLoss", "hover_map_loss"]


def _sobel_kernels() -> torch.Tensor:
    """``(2, 1, 3, 3)``: Sobel derivatives along x (columns) and y (rows), scaled so that a ramp of slope 1 gives 1."""
    smooth, derive = torch.tensor([1.0, 2.0, 1.0]) / 4, torch.tensor([-1.0, 0.0, 1.0]) / 2
    return torch.stack([torch.outer(smooth, derive), torch.outer(derive, smooth)])[:, None]


def hover_map_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, nuclei: torch.Tensor) -> torch.Tensor:
    """HoVer-Net's loss of its horizontal and vertical maps: mean squared error of the maps plus that of their
    gradients (the map's derivative along its own axis) inside nuclei, both in -1..1.

    Args:
        logits: ``(B, 2, H, W)`` the head's logits (maps = 2 sigmoid - 1).
        target: ``(B, 2, H, W)`` the maps in 0..1, as :class:`~sppnet_monai.transforms.NucleiInstanceTarget` gives them.
        weight: ``(B, 1, H, W)`` 1 where the maps are known, 0 elsewhere.
        nuclei: ``(B, 1, H, W)`` the nuclei mask, where gradients count.
    """
    pred, true = 2 * torch.sigmoid(logits.float()) - 1, 2 * target.float() - 1
    squared = ((pred - true) ** 2 * weight).sum() / (2 * weight.sum()).clamp(min=1.0)
    kernels = _sobel_kernels().to(pred)
    # Each map's derivative along its own axis: h along x (kernel 0), v along y (kernel 1).
    grad_pred = F.conv2d(pred, kernels, padding=1, groups=2)
    grad_true = F.conv2d(true, kernels, padding=1, groups=2)
    focus = weight * nuclei
    gradient = ((grad_pred - grad_true) ** 2 * focus).sum() / (2 * focus.sum()).clamp(min=1.0)
    return squared + gradient


class MaskInstanceLoss(nn.Module):
    """Loss of a network predicting nuclei (channel 0) and optionally K instance maps (channels 1..K).

    - prediction ``(B, 1, H, W)`` logits with target ``(B, 1, H, W)`` or ``(B, 2 + K, H, W)``: the mask loss;
    - prediction ``(B, 1 + K, H, W)`` with target ``(B, 2 + K, H, W)`` (nuclei, K instance maps in [0, 1], weight;
      see :class:`~sppnet_monai.transforms.NucleiInstanceTarget`): mask loss + ``instance_weight`` x the
      instance term, counted only where the weight is 1: soft Dice + binary cross-entropy of a boundary or
      distance map (cross-entropy takes the soft targets of a distance map as they are), HoVer-Net's
      :func:`hover_map_loss` of ``"hv"`` maps;
    - with ``clicked_channel``, that prediction channel against the target's last channel (the nucleus
      under the positive click), Dice + cross-entropy times ``click_weight``, on every image: the component
      of a binary mask under a click is one nucleus far more often than a clump, and the outlined images
      alone were too few (11 of MoNuSeg's 24 training images: after 30 epochs the head returned nothing,
      clicked-nucleus Dice 0.0002 on validation).

    Args:
        mask_loss: ``"dice"`` (MONAI's ``DiceLoss``) or ``"dice_ce"`` (``DiceCELoss``: Dice + cross-entropy).
        instance_weight: weight of the instance term.
        clicked_channel: the click head's output channel (``sppnet_monai.networks.clicked_channel``), None without one.
        click_weight: weight of the click term.
        instance_head: what the instance maps are (``SPPNet(instance_head=...)``): sets K and the instance term;
            None: K is what the prediction's channels leave (0 or 1), learnt as a boundary or distance map.
    """

    def __init__(
        self,
        mask_loss: str = "dice",
        instance_weight: float = 1.0,
        clicked_channel: int | None = None,
        click_weight: float = 1.0,
        instance_head: str | None = None,
    ) -> None:
        super().__init__()
        losses = {"dice": lambda: DiceLoss(sigmoid=True), "dice_ce": lambda: DiceCELoss(sigmoid=True)}
        if mask_loss not in losses:
            raise ValueError(f"mask_loss must be one of {sorted(losses)}, got {mask_loss!r}.")
        self.mask_loss = losses[mask_loss]()
        self.instance_dice = DiceLoss(sigmoid=False)
        self.instance_weight = instance_weight
        self.clicked_channel = clicked_channel
        self.click_weight = click_weight
        self.instance_head = instance_head

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.mask_loss(pred[:, :1], target[:, :1])
        clicked = int(self.clicked_channel is not None)
        if pred.shape[1] == 1 and not clicked:
            return loss
        maps = instance_channels(self.instance_head) if self.instance_head is not None else pred.shape[1] - 1 - clicked
        if self.instance_head is None and maps not in (0, 1):
            raise ValueError(f"predictions (B, {pred.shape[1]}, H, W) hold {maps} instance maps: instance_head must say what they are (e.g. 'hv').")
        if pred.shape[1] != 1 + maps + clicked or target.shape[1] != 2 + max(maps, 1) + clicked:
            raise ValueError(
                f"expected predictions (B, {1 + maps + clicked}, H, W) and targets (B, {2 + max(maps, 1) + clicked}, H, W) "
                f"for instance head {self.instance_head!r}, got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        weight = target[:, -1 - clicked : target.shape[1] - clicked]
        if self.instance_head == "hv":
            loss = loss + self.instance_weight * hover_map_loss(pred[:, 1:3], target[:, 1:3], weight, target[:, :1])
        elif maps:
            loss = loss + self.instance_weight * self._weighted(pred[:, 1:2], target[:, 1:2], weight)
        if clicked:
            clicked_logits = pred[:, self.clicked_channel : self.clicked_channel + 1]
            loss = loss + self.click_weight * self._weighted(clicked_logits, target[:, -1:], torch.ones_like(weight))
        return loss

    def _weighted(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Soft Dice + binary cross-entropy of ``logits`` against ``target`` where ``weight`` is 1."""
        logits = logits.float()
        # Images without known instances (weight 0) contribute nothing: masked Dice is 0/0 -> 0 by
        # DiceLoss's smoothing, masked cross-entropy has no pixels.
        dice = self.instance_dice(torch.sigmoid(logits) * weight, target * weight)
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1.0)
        return dice + bce

"""Native-resolution mask decoding: LLSIE at full resolution, and upscaling stages after SAM's 1/4 output.

SAM's decoder draws its masks at 1/4 of the encoder input: a 256 window of native pixels gives 64x64
logits, coarse for nuclei 10-30 px across with 1-3 px gaps. These modules take the decoder's upscaled
embedding from 1/4 to 1/2 and 1/1, adding at each scale the low-level features of the image at that
scale, as U-shaped and CellViT-style decoders fuse their skips. The hypernetwork product of SAM's mask
tokens then happens at the input's own pixels, for every token (mask, instance head, clicked nucleus).
"""

from __future__ import annotations

from typing import Tuple

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from sppnet_monai.networks.llsie import LLSIE

__all__ = [
    "ClickBranch",
    "ConvEmbedding",
    "FULL_RESOLUTION_CHANS",
    "LLSIEPyramid",
    "UpscalingStage",
    "pyramid_chans",
    "residual_stack",
    "upscaling_stages_for",
]


def upscaling_stages_for(mask_stride: int) -> int:
    """How many 2x stages take SAM's 1/4 masks to ``1 / mask_stride`` (4 -> 0, 2 -> 1, 1 -> 2)."""
    stages = {4: 0, 2: 1, 1: 2}
    if mask_stride not in stages:
        raise ValueError(f"mask_stride must be one of {sorted(stages)}, got {mask_stride!r}.")
    return stages[mask_stride]


# Channels of the full-resolution features by default (SPPNet's full_resolution_chans): memory traffic at full
# resolution, not arithmetic, sets the CPU time there (32 channels measured 4x slower than 16 for a 3x3 stem,
# batch 8 of 256x256).
FULL_RESOLUTION_CHANS = 16


def _conv_relu_bn(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(out_chans))


def residual_stack(chans: int, count: int, dilated: bool = False) -> nn.Module:
    """``count`` of MONAI's residual units (two 3x3 convolutions, batch norm, ReLU) on ``chans`` channels; identity for 0.
    With ``dilated`` the k-th unit's convolutions have dilation ``2**k``.

    They give the convolutional path the depth of a U-Net level: SAM's tokens bring the context, these the
    receptive field of a nucleus and its border at each scale (LLSIE alone sees 5x5 pixels).
    """
    if count < 0:
        raise ValueError(f"residual_units must be 0 or more, got {count!r}.")
    units = [ResidualUnit(2, chans, chans, subunits=2, act="RELU", norm="BATCH", dilation=2**k if dilated else 1) for k in range(count)]
    return nn.Sequential(*units) if units else nn.Identity()


def pyramid_chans(chans: int, levels: int, full_resolution_chans: int = FULL_RESOLUTION_CHANS) -> Tuple[int, ...]:
    """Channels of each level of the low-level pyramid, finest first: the full-resolution level (of a 3-level
    pyramid) has ``full_resolution_chans``, the others ``chans``."""
    return tuple(full_resolution_chans if level == 0 and levels == 3 else chans for level in range(levels))


class LLSIEPyramid(nn.Module):
    """LLSIE on the image, then strided 3x3 convolutions: low-level features at each scale down to 1/4.

    Shapes:
        ``(B, in_chans, S', S')`` -> a tuple of ``levels`` tensors ``(B, C_k, S' / 2**k, S' / 2**k)``, finest
        first, ``C_k`` from :func:`pyramid_chans`; the last joins SAM's upscaled embedding as SPPNet's LLSIE does.

    ``units`` residual units (:func:`residual_stack`) follow each strided convolution; with 0 (the default,
    and every checkpoint saved before they existed) the pyramid is one convolution per scale.
    """

    def __init__(
        self, in_chans: int = 3, out_chans: int = 32, levels: int = 3, units: int = 0, full_resolution_chans: int = FULL_RESOLUTION_CHANS
    ) -> None:
        super().__init__()
        chans = pyramid_chans(out_chans, levels, full_resolution_chans)
        self.llsie = LLSIE(in_chans, chans[0])
        self.down = nn.ModuleList(_conv_relu_bn(chans[k], chans[k + 1], stride=2) for k in range(levels - 1))
        # Apart from ``down``, so that the keys of a pyramid without units stay those of older checkpoints; none at
        # the finest scale (see SPPNet's residual_units).
        self.units = nn.ModuleList(residual_stack(c, units if level else 0) for level, c in enumerate(chans)) if units else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = [self._deepen(self.llsie(x), 0)]
        for level, block in enumerate(self.down, start=1):
            features.append(self._deepen(block(features[-1]), level))
        return tuple(features)

    def _deepen(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return x if self.units is None else self.units[level](x)


class UpscalingStage(nn.Module):
    """One 2x stage of the mask decoder: transposed convolution, + the skip features, 3x3 convolution with a
    residual, then ``units`` residual units (:func:`residual_stack`; none by default, as in older checkpoints).

    Shapes:
        ``(B, in_chans, h, w)`` and skip ``(B or 1, out_chans, 2h, 2w)`` (or None) -> ``(B, out_chans, 2h, 2w)``.
    """

    def __init__(self, in_chans: int = 32, out_chans: int = 32, units: int = 0) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2)
        self.refine = _conv_relu_bn(out_chans, out_chans)
        self.units = residual_stack(out_chans, units) if units else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = x + skip.expand(x.shape[0], *skip.shape[1:])
        x = x + self.refine(x)
        return x if self.units is None else self.units(x)


class ConvEmbedding(nn.Module):
    """The LLSIE pyramid continued from 1/4 down to the image embedding's 1/16: strided 3x3 convolutions doubling
    the channels, ``units`` residual units after each, and a 1x1 projection to the embedding's channels.

    Added to the Tiny-ViT embedding, it gives SAM's decoder the deep levels of a U-Net's encoder beside the
    transformer's context: trained from random weights on a few images, convolutions learn nuclei faster.

    Shapes:
        ``(B, in_chans, S/4, S/4)`` -> ``(B, out_chans, S/16, S/16)``; :meth:`levels` also gives the
        ``(B, 2 * in_chans, S/8, S/8)`` features of the level between (SPPNet's ``eighth_skip``).
    """

    def __init__(self, in_chans: int = 32, out_chans: int = 256, units: int = 0) -> None:
        super().__init__()
        chans = (in_chans, 2 * in_chans, 4 * in_chans)
        self.down = nn.Sequential(
            *(nn.Sequential(_conv_relu_bn(chans[k], chans[k + 1], stride=2), residual_stack(chans[k + 1], units)) for k in range(2))
        )
        self.proj = nn.Conv2d(chans[-1], out_chans, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels(x)[1]

    def levels(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The 1/8 features and the 1/16 embedding of ``x``."""
        eighth = self.down[0](x)
        return eighth, self.proj(self.down[1](eighth))


class ClickBranch(nn.Module):
    """The click head's own features at the masks' scale: the decoder's embedding plus the positive clicks' guidance
    maps (1x1 convolution), then ``units`` residual units with dilations 1, 2, 4, ...

    The clicked nucleus's token reads these instead of the embedding that the mask and instance tokens share, so
    what the click head learns is not all taken from those features (a heavier click loss on them cost the mask
    0.022 Dice, bundle README "0.9.2"). The dilations let a click reach across a large nucleus (receptive field 13
    pixels with 2 units, 29 with 3).

    Shapes:
        embedding ``(P, C, H, W)`` and guidance ``(P, G, H, W)`` -> ``(P, C, H, W)``.
    """

    def __init__(self, chans: int, guidance_chans: int, units: int) -> None:
        super().__init__()
        if units < 1:
            raise ValueError(f"a click branch needs at least 1 residual unit, got {units!r}.")
        self.guidance_proj = nn.Conv2d(guidance_chans, chans, kernel_size=1)
        self.units = residual_stack(chans, units, dilated=True)

    def forward(self, embedding: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.units(embedding + self.guidance_proj(guidance.to(embedding.dtype)))

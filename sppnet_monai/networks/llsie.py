"""Low-Level Semantic Information Extractor (LLSIE), SPPNet's convolutional side branch."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LLSIE"]


def _conv_relu_bn(in_chans: int, out_chans: int, kernel_size: int, groups: int = 1) -> nn.Sequential:
    # Conv -> ReLU -> BatchNorm, the order of the released SPPNet code.
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2, groups=groups),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_chans),
    )


class LLSIE(nn.Module):
    """3x3 convolution, then a depthwise-separable block (3x3 depthwise with a residual, 1x1 pointwise).

    The head convolution lifts RGB to ``out_chans`` because depthwise convolutions do poorly on
    few channels (SPPNet, Sec. 2.2); the residual eases gradient flow.

    Shapes:
        ``(B, in_chans, H, W)`` -> ``(B, out_chans, H, W)``.
    """

    def __init__(self, in_chans: int = 3, out_chans: int = 32) -> None:
        super().__init__()
        self.head = _conv_relu_bn(in_chans, out_chans, 3)
        self.depthwise = _conv_relu_bn(out_chans, out_chans, 3, groups=out_chans)
        self.pointwise = _conv_relu_bn(out_chans, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        x = x + self.depthwise(x)
        return self.pointwise(x)

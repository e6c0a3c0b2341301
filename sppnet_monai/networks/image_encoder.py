"""Tiny-ViT image encoder in SAM's stride-16 layout (MobileSAM's ``vit_t``), built from timm."""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from timm.models import tiny_vit
from torch import nn

__all__ = ["TinyViTImageEncoder"]


class TinyViTImageEncoder(nn.Module):
    """timm's ``tiny_vit_5m_224`` trunk whose last stage keeps the stride at 16, plus SAM's neck.

    MobileSAM distils SAM's ViT-H into this layout: the patch merging before the last stage uses a
    stride-1 depthwise convolution, so a 1024x1024 image gives a 64x64 feature map, as SAM's
    encoder does. The neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps its 320 channels to
    the 256 of SAM's prompt encoder and mask decoder.

    Args:
        model_name: timm TinyViT variant that fixes dims, depths, heads and window sizes.
        out_chans: channels of the image embedding (SAM: 256).
        drop_path_rate: stochastic depth of the transformer blocks (0 in MobileSAM).

    Shapes:
        ``(B, 3, H, W)`` with H and W multiples of 16 -> ``(B, out_chans, H / 16, W / 16)``.
    """

    stride = 16

    def __init__(self, model_name: str = "tiny_vit_5m_224", out_chans: int = 256, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        # The builder is taken from timm's module, not its registry: other packages (MobileSAM) register
        # their own TinyViT under the same names.
        builder = getattr(tiny_vit, model_name, None)
        if builder is None or not model_name.startswith("tiny_vit_"):
            raise ValueError(f"unknown timm TinyViT variant {model_name!r}.")
        trunk = builder(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        # SAM's layout: no downsampling into the last stage (MobileSAM: stride_c = 1 for 320 channels).
        trunk.stages[-1].downsample.conv2.conv.stride = (1, 1)
        # Only the trunk is kept; timm's classification head has no place in SAM.
        self.patch_embed = trunk.patch_embed
        self.stages = trunk.stages
        trunk_chans = trunk.num_features
        self.neck = nn.Sequential(
            nn.Conv2d(trunk_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.stages(x)
        return self.neck(x)

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Replace every ``ConvNorm`` (conv + batch norm) by its folded convolution, in place (inference only).

        Also switches timm's attention to its explicit path: the fused one hands a float bias to
        ``scaled_dot_product_attention``, whose CPU kernel then spends about 7% of the encoder's time
        masking the softmax (``all``, ``isneginf``, ``where``) for rows that can never be empty here.
        """
        for module in list(self.modules()):
            if isinstance(module, tiny_vit.Attention):
                module.fused_attn = False
            for name, child in module.named_children():
                if isinstance(child, tiny_vit.ConvNorm):
                    setattr(module, name, child.fuse())

"""SPPNet: Tiny-ViT image encoder + SAM prompt encoder and mask decoder + LLSIE side branch.

Xu et al., "SPPNet: A Single-Point Prompt Network for Nuclei Image Segmentation", MLMI 2023.

Coordinates of clicks are ``(x, y) = (column, row)`` in pixels of the input image, as in SAM.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from torch import nn

from sppnet_monai.clicks import click_pixels
from sppnet_monai.networks.cached_decoding import CachedImageTokens
from sppnet_monai.networks.image_encoder import TinyViTImageEncoder
from sppnet_monai.networks.llsie import LLSIE
from sppnet_monai.networks.mask_decoder import LowLevelFeatures, SPPMaskDecoder
from sppnet_monai.networks.native_decoder import FULL_RESOLUTION_CHANS, ConvEmbedding, LLSIEPyramid, upscaling_stages_for
from sppnet_monai.utils import SPPNetError

__all__ = [
    "INSTANCE_CHANNEL",
    "INSTANCE_HEADS",
    "MASK_CHANNEL",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "RECIPE_DEFAULTS",
    "RECIPE_KEYS",
    "ImageFeatures",
    "SPPNet",
    "SPPNetOutput",
    "check_image_size",
    "clicked_channel",
    "clicks_from_guidance",
    "denormalize_rgb",
    "instance_channels",
]

# Point labels of SAM's prompt encoder: -1 marks a padding point ("no click").
POSITIVE, NEGATIVE, NO_POINT = 1, 0, -1

# SAM's RGB normalisation on 0-255 intensities (ImageNet statistics): the one definition in the project.
PIXEL_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)


def denormalize_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """0-255 RGB ``(3, H, W)`` from SAM-normalised ``rgb`` (the inverse of the bundle's ``NormalizeIntensityd``)."""
    mean = torch.as_tensor(PIXEL_MEAN, dtype=rgb.dtype, device=rgb.device)[:, None, None]
    std = torch.as_tensor(PIXEL_STD, dtype=rgb.dtype, device=rgb.device)[:, None, None]
    return rgb * std + mean


# What a trained network's shape or meaning depends on: saved with its weights (see SPPNet.recipe).
RECIPE_KEYS = ("image_size", "fusion", "encoder_name", "embed_dim", "instance_head", "mask_stride", "click_head", "residual_units", "mask_scale_units", "conv_embedding", "eighth_skip", "full_resolution_chans", "click_branch_units")
# What a checkpoint saved before a recipe key existed was built with (its absence means this value).
RECIPE_DEFAULTS = {"fusion": "add", "instance_head": None, "mask_stride": 4, "click_head": False, "residual_units": 0, "mask_scale_units": 0, "conv_embedding": False, "eighth_skip": False, "full_resolution_chans": FULL_RESOLUTION_CHANS, "click_branch_units": 0}

# What the instance head predicts (see SPPNet): nucleus contours, each nucleus's normalised distance map, or
# HoVer-Net's horizontal and vertical maps; and how many output channels (spare mask tokens) each takes.
INSTANCE_HEAD_CHANNELS = {"boundary": 1, "distance": 1, "hv": 2}
INSTANCE_HEADS = tuple(INSTANCE_HEAD_CHANNELS)
# Output channels: nuclei mask logits, then the instance head's logits (when it has one: from INSTANCE_CHANNEL,
# instance_channels of them), then the clicked nucleus's logits (with a click head; see clicked_channel).
MASK_CHANNEL, INSTANCE_CHANNEL = 0, 1


def instance_channels(instance_head: Optional[str]) -> int:
    """Output channels of the instance head ``instance_head`` (0 for None)."""
    return INSTANCE_HEAD_CHANNELS[instance_head] if instance_head is not None else 0


def clicked_channel(instance_head: Optional[str], click_head: bool) -> Optional[int]:
    """Output channel of the clicked nucleus: after the mask and the instance head's maps; None without a click head."""
    return 1 + instance_channels(instance_head) if click_head else None


class ImageFeatures(NamedTuple):
    """What the encoders compute once per image, reusable for any number of prompts.

    embeddings: ``(B, 256, S/16, S/16)`` Tiny-ViT + neck output.
    low_level: ``(B, 32, S/4, S/4)`` LLSIE features, or with ``mask_stride`` < 4 a tuple of them at
        ``S / mask_stride`` ... ``S/4``, finest first, then with ``eighth_skip`` the conv embedding's
        ``(B, 64, S/8, S/8)``; None without LLSIE.
    input_size: ``(H, W)`` of the image before padding to ``S x S``.
    decoder_cache: the mask decoder's per-image work (``SPPMaskDecoder.cache_image``), computed by
        ``encode`` in eval mode so that each prompt costs less; None in training. Decoding uses it
        instead of ``embeddings``: replacing ``embeddings`` means replacing it too (None is fine).
    """

    embeddings: torch.Tensor
    low_level: Optional[LowLevelFeatures]
    input_size: Tuple[int, int]
    decoder_cache: Optional[CachedImageTokens] = None


class SPPNetOutput(NamedTuple):
    """masks: ``(P, M, H, W)`` logits at input size; iou_predictions: ``(P, M)``;
    low_res_masks: ``(P, M, S/m, S/m)`` logits as the decoder draws them, m = ``mask_stride`` (the paper's
    256x256 output at S = 1024, m = 4)."""

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    low_res_masks: torch.Tensor


def clicks_from_guidance(click_maps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read one click per guidance map: the position of its maximum, absent if the map is all <= 0.

    Args:
        click_maps: ``(B, 2, H, W)``: positive-click map, then negative-click map.

    Returns:
        point_coords ``(B, 2, 2)`` float32 ``(x, y)`` and point_labels ``(B, 2)``: 1 for the positive
        click, 0 for the negative one, -1 (SAM's padding point) where a map holds no click. With
        several clicks in one map, the first in scan order is read (see :meth:`SPPNet.decode_guidance`
        for what several positive clicks mean).
    """
    batch, num_maps, _, width = click_maps.shape
    peak, index = click_maps.flatten(2).max(dim=2)
    rows = torch.div(index, width, rounding_mode="floor")
    point_coords = torch.stack((index % width, rows), dim=-1).float()
    map_labels = torch.tensor([POSITIVE, NEGATIVE], device=click_maps.device)[:num_maps]
    point_labels = torch.where(peak > 0, map_labels.expand(batch, -1), torch.full_like(index, NO_POINT))
    return point_coords, point_labels


def _image_of_batch(features: ImageFeatures, index: int) -> ImageFeatures:
    """The features of image ``index`` of a batch, as a batch of one (tensors shared across the batch stay)."""
    batch = features.embeddings.shape[0]

    def pick(value):
        if isinstance(value, tuple):
            return tuple(pick(item) for item in value)
        return value[index : index + 1] if isinstance(value, torch.Tensor) and value.shape[0] == batch else value

    cache = features.decoder_cache
    return ImageFeatures(
        pick(features.embeddings),
        pick(features.low_level),
        features.input_size,
        None if cache is None else type(cache)(*(pick(value) for value in cache)),
    )


class SPPNet(nn.Module):
    """Single-point prompt network for nuclei segmentation.

    One positive click on a nucleus and one background click in, the semantic mask of all nuclei
    in the image out. Three ways to call it:

    - ``net(image)`` with ``image`` ``(B, 5, H, W)``: SAM-normalised RGB, a positive-click map and a
      negative-click map (see :func:`clicks_from_guidance`); returns mask logits ``(B, 1, H, W)``.
      This is the call MONAI's inferers, ``verify_net_in_out``, TorchScript export and MONAI Label use.
    - ``net.predict(rgb, point_coords, point_labels)`` with explicit SAM-style points.
    - ``features = net.encode(rgb)`` once, then ``net.decode(features, coords, labels)`` for any
      number of prompts against the cached embedding (SAM's predictor pattern).

    Images up to ``image_size`` on each side are padded at the bottom and right to
    ``image_size x image_size`` (as SAM does) and the masks cropped back; larger images must be
    tiled (e.g. ``monai.inferers.SlidingWindowInferer``) or resized.

    Args:
        image_size: encoder input size S (1024 in the paper); a multiple of 16, at least 64.
        fusion: how LLSIE features join the decoder: ``"add"`` (released code), ``"concat"``
            (paper text: LLSIE at S/2, 2x2 max pooling, concatenation, 1x1 conv) or ``"none"``.
        encoder_name: timm TinyViT variant of the image encoder.
        embed_dim: channels of the image embedding and prompt tokens (SAM: 256).
        multimask_output: return SAM's three candidate masks instead of the single one.
        drop_path_rate: stochastic depth in the image encoder.
        instance_head: also predict, from the first spare mask token of SAM's decoder (output
            channel ``INSTANCE_CHANNEL``), a map that separates touching nuclei: ``"boundary"``, each
            nucleus's contour (DCAN, CDNet), ``"distance"``, each nucleus's distance to its own
            border normalised to 1 at its centre (Naylor et al., HoVer-Net's idea in one channel), or
            ``"hv"``, HoVer-Net's horizontal and vertical distances to each nucleus's centre (two
            channels, two spare tokens), whose cores seed the watershed (:mod:`~sppnet_monai.postprocess`).
            None: the mask alone.
            Same weights and keys either way, so any SPPNet checkpoint loads into any of them.
        mask_stride: the decoder's masks are at ``1 / mask_stride`` of the input: 4 is SAM's decoder
            (64x64 logits for a 256 window); 2 or 1 add upscaling stages fed by LLSIE at full
            resolution (:mod:`~sppnet_monai.networks.native_decoder`), 1 draws every input pixel.
        click_head: also return, from the next spare mask token (channel :attr:`clicked_channel`), the
            nucleus under the positive click alone (NuClick's task), beside the mask of all nuclei.
        residual_units: with ``mask_stride`` 1 or 2, MONAI residual units (two 3x3 convolutions each) at each
            pyramid level coarser than the masks and after each upscaling stage but the last: a U-Net level's
            depth for the convolutional path. None at the masks' own scale, bound by memory traffic there (2
            units at every scale made a bf16 training step 1.46x slower, 1.17x without the finest). 0: one
            convolution per scale, as in checkpoints before 0.7.
        mask_scale_units: with ``mask_stride`` 1 or 2, residual units after the last upscaling stage, at the masks'
            own scale, where a U-Net's last level refines borders; they run once per prompt, on 16 channels at
            full resolution. 0: none, as in checkpoints before 0.8.
        conv_embedding: with ``mask_stride`` 1 or 2, the LLSIE pyramid goes on from 1/4 to 1/16
            (:class:`~sppnet_monai.networks.native_decoder.ConvEmbedding`, with ``residual_units`` at each level)
            and is added to the Tiny-ViT embedding: a U-Net encoder's deep levels beside the transformer.
            False: the embedding is Tiny-ViT's alone, as in checkpoints before 0.8.
        eighth_skip: with ``conv_embedding``, its 1/8 features join SAM's output upscaling at 1/8 (after the
            first transposed convolution and its norm), the one U-Net skip the decoder lacked: every scale from
            1/16 to the masks' then has a convolutional feature. No weights of its own. False: as before 0.8.1.
        full_resolution_chans: with ``mask_stride`` 1, the channels of the full-resolution level (LLSIE, the last
            upscaling stage and its units, the hypernetwork product); the U-Net baseline has 32 there. 16: as
            before 0.8.1.
        click_branch_units: with ``click_head``, the clicked nucleus's token reads features of its own at the masks'
            scale (:class:`~sppnet_monai.networks.native_decoder.ClickBranch`: this many dilated residual units on the
            shared embedding plus the click guidance) instead of the embedding the mask and instance head read; the
            guidance map has a second, wider Gaussian (:data:`CLICK_BRANCH_SIGMAS`). 0: as before 0.9.3.
    """

    in_channels = 5

    def __init__(
        self,
        image_size: int = 1024,
        fusion: str = "add",
        encoder_name: str = "tiny_vit_5m_224",
        embed_dim: int = 256,
        multimask_output: bool = False,
        drop_path_rate: float = 0.0,
        instance_head: Optional[str] = None,
        mask_stride: int = 4,
        click_head: bool = False,
        residual_units: int = 0,
        mask_scale_units: int = 0,
        conv_embedding: bool = False,
        eighth_skip: bool = False,
        full_resolution_chans: int = FULL_RESOLUTION_CHANS,
        click_branch_units: int = 0,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        if instance_head not in (None, *INSTANCE_HEADS):
            raise ValueError(f"instance_head must be None or one of {INSTANCE_HEADS}, got {instance_head!r}.")
        if (instance_head or click_head) and multimask_output:
            raise ValueError("the instance and click heads use spare mask tokens of the decoder: they cannot go with multimask_output.")
        stages = upscaling_stages_for(mask_stride)
        if residual_units and not (stages and fusion != "none"):
            raise SPPNetError(
                f"residual_units deepen the LLSIE pyramid: they need mask_stride 1 or 2 and LLSIE fusion, got mask_stride {mask_stride!r}, fusion {fusion!r}."
            )
        if conv_embedding and not (stages and fusion != "none"):
            raise SPPNetError(
                f"conv_embedding continues the LLSIE pyramid: it needs mask_stride 1 or 2 and LLSIE fusion, got mask_stride {mask_stride!r}, fusion {fusion!r}."
            )
        if eighth_skip and not conv_embedding:
            raise SPPNetError("eighth_skip passes the conv embedding's 1/8 features to the decoder: it needs conv_embedding True.")
        if full_resolution_chans != FULL_RESOLUTION_CHANS and mask_stride != 1:
            raise SPPNetError(f"full_resolution_chans sets the full-resolution level: it needs mask_stride 1, got {mask_stride!r}.")
        if full_resolution_chans < 1:
            raise SPPNetError(f"full_resolution_chans must be at least 1, got {full_resolution_chans!r}.")
        if click_branch_units and not click_head:
            raise SPPNetError(f"click_branch_units give the click head features of its own: they need click_head True, got {click_branch_units!r} units without it.")
        if click_branch_units < 0:
            raise SPPNetError(f"click_branch_units must be 0 or more, got {click_branch_units!r}.")
        if mask_scale_units and not stages:
            raise SPPNetError(f"mask_scale_units follow the last upscaling stage: they need mask_stride 1 or 2, got {mask_stride!r}.")
        stride = TinyViTImageEncoder.stride
        self.image_size = image_size
        self.multimask_output = multimask_output
        self._recipe = {
            "image_size": int(image_size),
            "fusion": fusion,
            "encoder_name": encoder_name,
            "embed_dim": int(embed_dim),
            "instance_head": instance_head,
            "mask_stride": int(mask_stride),
            "click_head": bool(click_head),
            "residual_units": int(residual_units),
            "mask_scale_units": int(mask_scale_units),
            "conv_embedding": bool(conv_embedding),
            "eighth_skip": bool(eighth_skip),
            "full_resolution_chans": int(full_resolution_chans),
            "click_branch_units": int(click_branch_units),
        }
        self.loaded_recipe: Optional[Dict[str, Any]] = None
        embedding_size = image_size // stride
        self.image_encoder = TinyViTImageEncoder(encoder_name, out_chans=embed_dim, drop_path_rate=drop_path_rate)
        self.prompt_encoder = PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        self.mask_decoder = SPPMaskDecoder(
            fusion=fusion,
            extra_outputs=instance_channels(instance_head) + int(bool(click_head)),
            upscaling_stages=stages,
            residual_units=residual_units,
            mask_scale_units=mask_scale_units,
            eighth_skip=bool(eighth_skip),
            full_resolution_chans=int(full_resolution_chans),
            click_guidance=bool(click_head),
            click_branch_units=int(click_branch_units),
            guidance_chans=len(self._guidance_sigmas()),
            transformer_dim=embed_dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        # The decoder's masks are at S/4 (S / mask_stride after its upscaling stages); LLSIE must match,
        # directly ("add") or after 2x2 pooling ("concat"), or as a pyramid from full resolution down to S/4.
        self.mask_size = image_size // mask_stride
        self.llsie: Optional[nn.Module] = None
        if fusion != "none" and stages:
            self.llsie_input_size = self.mask_size
            self.llsie = LLSIEPyramid(3, embed_dim // 8, levels=stages + 1, units=residual_units, full_resolution_chans=full_resolution_chans)
        elif fusion != "none":
            pool = fusion == "concat"
            self.llsie_input_size = self.mask_size * (2 if pool else 1)
            self.llsie = nn.Sequential(LLSIE(3, embed_dim // 8), nn.MaxPool2d(2) if pool else nn.Identity())
        self.conv_embedding = ConvEmbedding(embed_dim // 8, embed_dim, units=residual_units) if conv_embedding else None

    @torch.no_grad()
    def optimize_for_inference(self) -> "SPPNet":
        """Make this network faster for inference, in place, with the same outputs (within float rounding).

        Folds each batch norm of the Tiny-ViT encoder into the convolution before it (timm's
        ``ConvNorm.fuse``), computes its attention explicitly instead of through SDPA's masked CPU
        kernel, and stores the weights channels-last, the layout oneDNN's convolutions are fastest in
        on CPU. Call it after loading weights: the folded network has no batch-norm
        statistics left, so it cannot be trained or save a checkpoint in this project's format.
        """
        self.eval()
        self.image_encoder.fuse_for_inference()
        self.to(memory_format=torch.channels_last)
        return self

    def _guidance_sigmas(self) -> Tuple[float, ...]:
        """Spreads of the click guidance map's channels: a click branch reads a wider one beside the narrow one."""
        return CLICK_BRANCH_SIGMAS if self._recipe["click_branch_units"] else (CLICK_GUIDANCE_SIGMA,)

    @property
    def fusion(self) -> str:
        return self.mask_decoder.fusion

    @property
    def instance_head(self) -> Optional[str]:
        return self._recipe["instance_head"]

    @property
    def click_head(self) -> bool:
        return self._recipe["click_head"]

    @property
    def mask_stride(self) -> int:
        return self._recipe["mask_stride"]

    @property
    def clicked_channel(self) -> Optional[int]:
        """Output channel of the clicked nucleus (:func:`clicked_channel`); None without a click head."""
        return clicked_channel(self.instance_head, self.click_head)

    @property
    def out_channels(self) -> int:
        """Channels of :meth:`forward`'s logits: the mask, then the instance map and the clicked nucleus, or SAM's other candidates."""
        return 3 if self.multimask_output else 1 + instance_channels(self.instance_head) + int(self.click_head)

    @property
    def recipe(self) -> Dict[str, Any]:
        """The settings this network's weights only make sense with, and the package version that saved them.

        Saved in every state dict (``_extra_state``), so ``models/model.pt`` tells inference what to
        build; :func:`~sppnet_monai.networks.checkpoints.load_checkpoint` refuses a contradicting network.
        """
        from sppnet_monai import __version__

        return {**self._recipe, "version": __version__}

    def get_extra_state(self) -> Dict[str, Any]:
        return {"recipe": self.recipe}

    def set_extra_state(self, state: Any) -> None:
        # load_checkpoint compares recipes before loading, with a message naming the file.
        self.loaded_recipe = dict(state.get("recipe", {})) if isinstance(state, dict) else {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A state dict saved before the recipe existed (sppnet_monai < 0.2) has no "_extra_state": it still
        # loads strictly (MONAI's CheckpointLoader, a plain load_state_dict), with an empty recipe.
        state_dict.setdefault(prefix + "_extra_state", {})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def encode(self, image: torch.Tensor) -> ImageFeatures:
        """Image embedding and LLSIE features of ``image`` ``(B, 3, H, W)``, SAM-normalised, H, W <= S.

        In eval mode also the decoder's per-image work, which :meth:`decode` then reuses for every prompt.
        """
        _check_image(image, 3, self.image_size)
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, self.image_size - width, 0, self.image_size - height))
        padded = padded.contiguous(memory_format=_memory_format(self))
        embeddings = self.image_encoder(padded)
        low_level = None
        if self.llsie is not None:
            size = (self.llsie_input_size, self.llsie_input_size)
            if size != tuple(padded.shape[-2:]):
                padded = F.interpolate(padded, size=size, mode="bilinear", align_corners=False, antialias=True)
            low_level = self.llsie(padded)
            if self.conv_embedding is not None:
                eighth, conv = self.conv_embedding.levels(low_level[-1])
                embeddings = embeddings + conv
                if self.mask_decoder.eighth_skip:
                    low_level = (*low_level, eighth)
        decoder_cache = None
        if not self.training:  # training decodes each image once, through segment-anything's own forward
            _, no_mask_embedding = self.prompt_encoder(points=None, boxes=None, masks=None)
            decoder_cache = self.mask_decoder.cache_image(embeddings, self.prompt_encoder.get_dense_pe(), no_mask_embedding)
        return ImageFeatures(embeddings, low_level, (height, width), decoder_cache)

    def decode(
        self,
        features: ImageFeatures,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask_output: Optional[bool] = None,
    ) -> SPPNetOutput:
        """Masks for P prompts against cached ``features`` (of batch P, or 1 for all prompts).

        Args:
            point_coords: ``(P, N, 2)`` pixel ``(x, y)`` in the input image.
            point_labels: ``(P, N)``: 1 positive, 0 negative, -1 padding (ignored).
        """
        _check_points(point_coords, point_labels, features.input_size)
        return self._decode(features, point_coords, point_labels, multimask_output)

    def predict(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask_output: Optional[bool] = None,
    ) -> SPPNetOutput:
        """Encode ``image`` ``(B, 3, H, W)`` and decode one prompt per image (``point_coords`` ``(B, N, 2)``)."""
        return self.decode(self.encode(image), point_coords, point_labels, multimask_output)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(B, out_channels, H, W)`` of ``image`` ``(B, 5, H, W)``: the mask, then the instance map
        with an ``instance_head`` and the clicked nucleus with a ``click_head``; SAM's 3 candidates with ``multimask_output``."""
        _check_image(image, self.in_channels, self.image_size)
        return self.decode_guidance(self.encode(image[:, :3]), image[:, 3:5])

    def decode_guidance(self, features: ImageFeatures, click_maps: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(B, M, H, W)`` for the clicks of ``click_maps`` ``(B, 2, H, W)`` against ``features``.

        One positive click per map is SPPNet's prompt (with the negative map's click, see
        :func:`clicks_from_guidance`). Several positive clicks in one map (pixels at its maximum) are several prompts, each
        with that same negative click (the first in scan order), and the result is their union: the
        pixel-wise maximum of their logits (``sppnet_monai.clicks`` states this rule for every path).
        ``forward`` is ``decode_guidance(encode(rgb), click_maps)``; the MONAI Label app calls the
        two halves itself to reuse the encoding.
        """
        point_coords, point_labels = clicks_from_guidance(click_maps)
        # A click is a pixel holding its map's maximum (1.0 in click maps): a map of random values, such as
        # MONAI's verify_net_in_out feeds, is one click at its peak, not a million.
        peaks = click_maps[:, 0].flatten(1).amax(dim=1)[:, None, None]
        positives = (click_maps[:, 0] > 0) & (click_maps[:, 0] == peaks)
        if torch.jit.is_tracing() or int(positives.flatten(1).sum(dim=1).max()) <= 1:
            return self._decode(features, point_coords, point_labels, None).masks
        masks = []
        for index in range(click_maps.shape[0]):
            rows, cols = torch.nonzero(positives[index], as_tuple=True)
            if rows.numel() <= 1:
                coords, labels = point_coords[index : index + 1], point_labels[index : index + 1]
            else:
                negative = point_coords[index, 1].expand(rows.numel(), 2)
                coords = torch.stack((torch.stack((cols, rows), dim=-1).float(), negative), dim=1)
                labels = torch.stack((torch.full_like(rows, POSITIVE), point_labels[index, 1].expand(rows.numel())), dim=1)
            out = self._decode(_image_of_batch(features, index), coords, labels, None)
            masks.append(out.masks.amax(dim=0, keepdim=True))
        return torch.cat(masks)

    def _decode(
        self,
        features: ImageFeatures,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask_output: Optional[bool],
    ) -> SPPNetOutput:
        multimask = self.multimask_output if multimask_output is None else multimask_output
        sparse, dense = self.prompt_encoder(points=(point_coords.float(), point_labels), boxes=None, masks=None)
        cache = features.decoder_cache
        image_pe = self.prompt_encoder.get_dense_pe() if cache is None else None  # the cache holds it
        guidance = (
            click_guidance_map(point_coords, point_labels, self.mask_size, self.image_size, self._guidance_sigmas()) if self.click_head else None
        )
        low_res_masks, iou_predictions = self.mask_decoder(
            features.embeddings, image_pe, sparse, dense, multimask, features.low_level, cache, guidance
        )
        masks = low_res_masks
        if masks.shape[-1] != self.image_size:
            masks = F.interpolate(low_res_masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        height, width = features.input_size
        return SPPNetOutput(masks[..., :height, :width], iou_predictions, low_res_masks)


# Spread (input pixels) of each positive click in the click head's guidance map: about a small nucleus's radius.
CLICK_GUIDANCE_SIGMA = 4.0
# A click branch's guidance: the narrow Gaussian that places the click, and one about a large nucleus's radius that
# reaches every pixel of the nucleus under it.
CLICK_BRANCH_SIGMAS: Tuple[float, ...] = (CLICK_GUIDANCE_SIGMA, 3 * CLICK_GUIDANCE_SIGMA)


def click_guidance_map(
    point_coords: torch.Tensor, point_labels: torch.Tensor, size: int, image_size: int, sigmas: Sequence[float] = (CLICK_GUIDANCE_SIGMA,)
) -> torch.Tensor:
    """``(P, len(sigmas), size, size)``: for each prompt and each spread in ``sigmas`` (input pixels), a Gaussian around each
    of its positive clicks (their maximum), at the decoder's mask resolution ``size`` of an ``image_size`` input."""
    scale = size / image_size
    centres = (point_coords.float() + 0.5) * scale - 0.5  # pixel centres sit at integer coordinates
    grid = torch.arange(size, device=point_coords.device, dtype=torch.float32)
    dx = grid[None, None, None, :] - centres[..., 0, None, None]  # (P, N, 1, size)
    dy = grid[None, None, :, None] - centres[..., 1, None, None]  # (P, N, size, 1)
    squared = dx**2 + dy**2
    positive = (point_labels == POSITIVE)[..., None, None]
    maps = [(torch.exp(-squared / (2 * (sigma * scale) ** 2)) * positive).amax(dim=1) for sigma in sigmas]
    return torch.stack(maps, dim=1)


def check_image_size(image_size: int) -> int:
    """Raise SPPNetError (a ValueError) unless ``image_size`` is an encoder input SPPNet can take (stride-16 grid, 4 cells at least)."""
    stride = TinyViTImageEncoder.stride
    try:
        size = operator.index(image_size) if not isinstance(image_size, bool) else None  # ints, numpy ints
    except TypeError:
        size = None
    if size is None or size % stride or size < 4 * stride:
        raise SPPNetError(f"image_size must be a multiple of {stride} and at least {4 * stride}, got {image_size!r}.")
    return size


def _memory_format(module: nn.Module) -> torch.memory_format:
    """Channels-last when ``module``'s first convolution weight is (see ``optimize_for_inference``)."""
    weight = next(m.weight for m in module.modules() if isinstance(m, nn.Conv2d))
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous() else torch.contiguous_format


def _check_image(image: torch.Tensor, channels: int, max_size: int) -> None:
    if image.ndim != 4 or image.shape[1] != channels:
        raise ValueError(f"SPPNet expects an image of shape (B, {channels}, H, W), got {tuple(image.shape)}.")
    if not image.is_floating_point():
        raise TypeError(f"SPPNet expects a floating-point (SAM-normalised) image, got {image.dtype}.")
    height, width = image.shape[-2:]
    if height > max_size or width > max_size:
        raise ValueError(
            f"image is {height}x{width} but the network input is {max_size}x{max_size}: tile it "
            "(monai.inferers.SlidingWindowInferer) or resize it."
        )


def _check_points(point_coords: torch.Tensor, point_labels: torch.Tensor, input_size: Tuple[int, int]) -> None:
    if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_labels.shape != point_coords.shape[:2]:
        raise ValueError(
            f"point_coords must be (P, N, 2) and point_labels (P, N), got {tuple(point_coords.shape)} "
            f"and {tuple(point_labels.shape)}."
        )
    if torch.jit.is_tracing():
        return
    height, width = input_size
    clicked = point_labels != NO_POINT
    click_pixels(point_coords[clicked].detach().cpu().numpy(), width, height, "point", "the image")

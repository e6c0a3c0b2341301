"""SAM's mask decoder with SPPNet's low-level feature fusion and batched image embeddings."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from segment_anything.modeling import MaskDecoder
from torch import nn
from torch.nn import functional as F

from sppnet_monai.networks.cached_decoding import CachedImageTokens, cache_image_tokens, two_way_transformer
from sppnet_monai.networks.native_decoder import FULL_RESOLUTION_CHANS, ClickBranch, UpscalingStage, pyramid_chans

# LLSIE features: one tensor at the decoder's 1/4 resolution, or a tuple finest first ending at 1/4 (LLSIEPyramid).
LowLevelFeatures = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

__all__ = ["FUSION_MODES", "SPPMaskDecoder"]

FUSION_MODES = ("add", "concat", "none")


def _check_batch(x: torch.Tensor, batch: int, name: str) -> None:
    """A per-image tensor pairs with ``batch`` prompts when its batch is ``batch`` or 1."""
    if x.shape[0] not in (batch, 1):
        raise ValueError(f"{name} has batch {x.shape[0]} but there are {batch} prompts; expected {batch} or 1.")


def _expand_to(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Broadcast a per-image tensor to ``batch`` prompts: its batch must be ``batch`` or 1."""
    _check_batch(x, batch, name)
    return x.expand(batch, *x.shape[1:])


class SPPMaskDecoder(MaskDecoder):
    """segment-anything's :class:`MaskDecoder`, fusing LLSIE features into its upscaled embedding.

    Same parameters and state-dict keys as SAM's decoder (``fusion="concat"`` adds ``fusion_proj``),
    so SAM and MobileSAM weights load unchanged. Two differences in ``predict_masks``:

    - image embeddings of batch B pair with B prompts (SAM repeats each embedding for every prompt,
      which gives B*B masks for a training batch); an embedding of batch 1 serves any number of
      prompts, as in SAM's predictor;
    - ``extra_outputs`` of SAM's spare mask tokens (the multimask ones, otherwise unused by SPPNet)
      follow the mask as extra output channels, e.g. a map that separates touching nuclei;
    - ``low_level_features`` (B or 1, transformer_dim / 8, 4h, 4w) from LLSIE are fused with the
      upscaled embedding before the hypernetwork product: ``"add"`` as in the released code,
      ``"concat"`` + 1x1 convolution as in the paper's text, ``"none"`` for the ablation without LLSIE;
    - ``upscaling_stages`` 2x stages (:class:`~sppnet_monai.networks.native_decoder.UpscalingStage`,
      keys ``upscaling_stages.*``) take the fused embedding on to 8h, 16h: with 2 the masks are at the
      encoder input's own resolution, each stage adding the LLSIE feature of its scale (then
      ``low_level_features`` is a tuple, finest first, ending with the one at 4h), each stage but the
      last ending with ``residual_units`` of MONAI's residual units, the last with ``mask_scale_units``;
    - with ``eighth_skip``, ``low_level_features`` ends with a feature at 2h (SPPNet's conv embedding, transformer_dim
      / 4 channels), added to SAM's output upscaling after its first transposed convolution and norm;
    - with ``click_guidance``, the last extra output is the clicked nucleus: the positive clicks' map joins the
      embedding at every scale (``guidance_proj``); with ``click_branch_units`` the clicked nucleus's token reads
      features of its own, that embedding plus the map again through a few residual units
      (:class:`~sppnet_monai.networks.native_decoder.ClickBranch`, keys ``click_branch.*``).

    For many prompts on one image, :meth:`cache_image` does the transformer's per-image work once;
    passed as ``image_cache``, it stands for the image embedding, positional encoding (which may then
    be None) and dense prompt embedding, and the masks are the same within float rounding (see
    ``cached_decoding``).
    """

    def __init__(
        self,
        *,
        fusion: str = "add",
        extra_outputs: int = 0,
        upscaling_stages: int = 0,
        residual_units: int = 0,
        mask_scale_units: int = 0,
        eighth_skip: bool = False,
        full_resolution_chans: int = FULL_RESOLUTION_CHANS,
        click_guidance: bool = False,
        click_branch_units: int = 0,
        guidance_chans: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}.")
        if not 0 <= extra_outputs <= self.num_multimask_outputs:
            raise ValueError(f"extra_outputs must be 0..{self.num_multimask_outputs} (the spare mask tokens), got {extra_outputs}.")
        self.fusion = fusion
        self.extra_outputs = extra_outputs
        self.eighth_skip = eighth_skip
        if fusion == "concat":
            mask_chans = self.transformer_dim // 8
            self.fusion_proj = nn.Conv2d(2 * mask_chans, mask_chans, kernel_size=1)
        # Channels at each scale, coarsest (SAM's 1/4 embedding) first, as the LLSIE pyramid gives them.
        chans = pyramid_chans(self.transformer_dim // 8, upscaling_stages + 1, full_resolution_chans)[::-1]
        self.upscaling_stages = nn.ModuleList(
            UpscalingStage(chans[k], chans[k + 1], residual_units if k < upscaling_stages - 1 else mask_scale_units)
            for k in range(upscaling_stages)
        )
        # SAM's hypernetworks give each mask token transformer_dim / 8 weights; a narrower full-resolution
        # embedding gets them through one linear map on the token side (cheap: no pixel is touched).
        self.hyper_proj = nn.Linear(chans[0], chans[-1]) if chans[-1] != chans[0] else None
        # Click guidance (NuClick's idea, for the click head): a map of the prompt's positive clicks joins the
        # embedding at every scale from 1/4 up, through a 1x1 convolution per scale. The two-way transformer
        # sees clicks only as tokens at 1/16, too coarse to tell one small nucleus from its neighbour.
        self.guidance_proj = nn.ModuleList(nn.Conv2d(guidance_chans, c, kernel_size=1) for c in chans) if click_guidance else None
        if click_branch_units and not (click_guidance and extra_outputs):
            raise ValueError("click_branch_units give the clicked nucleus its own features: they need click_guidance and an extra output for it.")
        self.click_branch = ClickBranch(chans[-1], guidance_chans, click_branch_units) if click_branch_units else None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: Optional[torch.Tensor],
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        low_level_features: Optional[LowLevelFeatures] = None,
        image_cache: Optional[CachedImageTokens] = None,
        click_guidance: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Masks ``(P, M, 4h, 4w)`` logits (``2**upscaling_stages`` times larger with upscaling stages) and IoU predictions ``(P, M)``.

        M = 1 + ``extra_outputs``: the single-mask token, then the first spare tokens (e.g. a boundary
        map or a distance map); M = 3, SAM's candidate masks, with ``multimask_output``.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, low_level_features, image_cache, click_guidance
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1 + self.extra_outputs)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: Optional[torch.Tensor],
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        low_level_features: Optional[LowLevelFeatures] = None,
        image_cache: Optional[CachedImageTokens] = None,
        click_guidance: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        num_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(num_prompts, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        if image_cache is None:
            if image_pe is None:
                raise ValueError("image_pe is needed unless an image_cache is given.")
            src = _expand_to(image_embeddings, num_prompts, "image_embeddings") + dense_prompt_embeddings
            pos_src = _expand_to(image_pe, num_prompts, "image_pe")
            b, c, h, w = src.shape
            hs, src = self.transformer(src, pos_src, tokens)
        else:
            _check_batch(image_cache.keys, num_prompts, "image_embeddings")
            h, w = image_cache.size
            hs, src = two_way_transformer(self.transformer, image_cache, tokens)
            b, c = src.shape[0], src.shape[2]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        if self.eighth_skip:
            if not isinstance(low_level_features, tuple):
                raise ValueError("eighth_skip needs the LLSIE features as a tuple ending with the 1/8 feature.")
            *quarter_and_finer, eighth = low_level_features
            low_level_features = tuple(quarter_and_finer)
            # SAM's output_upscaling: ConvTranspose, LayerNorm2d, activation, ConvTranspose, activation.
            upscaled = self.output_upscaling[:2](src)
            upscaled = self.output_upscaling[2:](upscaled + _expand_to(eighth, upscaled.shape[0], "the 1/8 feature"))
        else:
            upscaled = self.output_upscaling(src)
        upscaled_embedding = self._fuse(upscaled, low_level_features, click_guidance)
        hyper_in_list: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)
        ]
        hyper_in = torch.stack(hyper_in_list, dim=1)
        if self.hyper_proj is not None:
            hyper_in = self.hyper_proj(hyper_in)
        b, c, h, w = upscaled_embedding.shape
        masks = (hyper_in @ upscaled_embedding.reshape(b, c, h * w)).reshape(b, -1, h, w)
        if self.click_branch is not None:
            if click_guidance is None:
                raise ValueError("this decoder has a click branch: it needs the positive clicks' map (click_guidance).")
            clicked = self.extra_outputs  # the last extra output's token
            features = self.click_branch(upscaled_embedding, _resize_guidance(click_guidance, w))
            clicked_mask = (hyper_in[:, clicked : clicked + 1] @ features.reshape(b, c, h * w)).reshape(b, 1, h, w)
            masks = torch.cat((masks[:, :clicked], clicked_mask, masks[:, clicked + 1 :]), dim=1)
        return masks, self.iou_prediction_head(iou_token_out)

    def cache_image(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense_prompt_embeddings: torch.Tensor
    ) -> CachedImageTokens:
        """The transformer's prompt-independent work on ``image_embeddings`` ``(B, C, h, w)``, for ``image_cache``."""
        return cache_image_tokens(self.transformer, image_embeddings + dense_prompt_embeddings, image_pe)

    def _fuse(self, upscaled: torch.Tensor, low_level: Optional[LowLevelFeatures], guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The upscaled embedding fused with the LLSIE feature at 1/4, then taken through the upscaling stages;
        ``guidance`` ``(P, 1, H, W)`` at the masks' resolution, the positive clicks' map (with ``click_guidance``)."""
        skips: Tuple[Optional[torch.Tensor], ...] = (None,) * (len(self.upscaling_stages) + 1)
        if self.fusion != "none":
            if low_level is None:
                raise ValueError(f"fusion={self.fusion!r} needs the LLSIE features (low_level_features).")
            skips = low_level if isinstance(low_level, tuple) else (low_level,)
            if len(skips) != len(self.upscaling_stages) + 1:
                raise ValueError(f"expected {len(self.upscaling_stages) + 1} LLSIE features (one per scale), got {len(skips)}.")
            quarter = _expand_to(skips[-1], upscaled.shape[0], "low_level_features")
            upscaled = upscaled + quarter if self.fusion == "add" else self.fusion_proj(torch.cat([upscaled, quarter], dim=1))
        upscaled = self._guide(upscaled, guidance, 0)
        for index, (stage, skip) in enumerate(zip(self.upscaling_stages, reversed(skips[:-1])), start=1):
            if skip is not None:
                _check_batch(skip, upscaled.shape[0], "low_level_features")
            upscaled = self._guide(stage(upscaled, skip), guidance, index)
        return upscaled

    def _guide(self, embedding: torch.Tensor, guidance: Optional[torch.Tensor], scale: int) -> torch.Tensor:
        """``embedding`` plus the click guidance at its resolution (``scale`` counts the stages from 1/4)."""
        if self.guidance_proj is None:
            return embedding
        if guidance is None:
            raise ValueError("this decoder has click guidance: it needs the positive clicks' map (click_guidance).")
        return embedding + self.guidance_proj[scale](_resize_guidance(guidance, embedding.shape[-1]).to(embedding.dtype))


def _resize_guidance(guidance: torch.Tensor, size: int) -> torch.Tensor:
    """The click guidance ``(P, G, S, S)`` at ``size`` (S a multiple of it), a click's peak kept by max pooling."""
    factor = guidance.shape[-1] // size
    return F.max_pool2d(guidance, factor) if factor > 1 else guidance

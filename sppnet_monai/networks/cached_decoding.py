"""segment-anything's two-way transformer evaluated per click against a cached image: same maths, less work.

A click runs SAM's mask decoder over the whole image embedding (4096 tokens at 1024), and most of
that time goes to linear maps of those image tokens. Two facts make much of it avoidable:

- in the first layer the image tokens do not depend on the prompt, so their projections are
  computed once per image (:func:`cache_image_tokens`);
- a prompt has few tokens (T = 8: IoU token, 4 mask tokens, 2 clicks, 1 padding point), so the
  attention between them and the image can move each projection onto the token side, by
  associativity: ``softmax(q (x W_k^T)^T) x W_v^T = softmax((q W_k) x^T) (x W_v^T)``. Per image
  token that costs ``heads * T`` (64) multiply-adds per channel instead of ``internal_dim`` (128).

:func:`two_way_transformer` returns what ``TwoWayTransformer.forward`` returns, within float
rounding (the tests compare them). Key biases drop out of the softmax; value and output biases pass
through unchanged because attention rows sum to one.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import Tensor

__all__ = ["CachedImageTokens", "cache_image_tokens", "two_way_transformer"]


class CachedImageTokens(NamedTuple):
    """The prompt-independent part of the decoder's first layer for B images (N = h * w tokens).

    size: ``(h, w)`` of the embedding grid.
    keys: ``(B, N, C)`` image embedding plus the dense (no-mask) prompt embedding.
    key_pe: ``(1, N, C)`` positional encoding of the image tokens.
    token_to_image_keys, token_to_image_values: ``(B, heads, N, C')`` first-layer projections.
    image_to_token_queries: ``(B, heads, N, C')`` first-layer projection.
    """

    size: Tuple[int, int]
    keys: Tensor
    key_pe: Tensor
    token_to_image_keys: Tensor
    token_to_image_values: Tensor
    image_to_token_queries: Tensor


def cache_image_tokens(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor) -> CachedImageTokens:
    """Precompute the first layer's image-side projections of ``image`` ``(B, C, h, w)`` (embedding + dense prompt)."""
    keys = image.flatten(2).transpose(1, 2).contiguous()  # row-major tokens: every per-click product reads them
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    first = transformer.layers[0]
    keys_with_pe = keys + key_pe
    to_image, to_token = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    return CachedImageTokens(
        size=(image.shape[-2], image.shape[-1]),
        keys=keys,
        key_pe=key_pe,
        token_to_image_keys=to_image._separate_heads(to_image.k_proj(keys_with_pe), to_image.num_heads),
        token_to_image_values=to_image._separate_heads(to_image.v_proj(keys), to_image.num_heads),
        image_to_token_queries=to_token._separate_heads(to_token.q_proj(keys_with_pe), to_token.num_heads),
    )


def two_way_transformer(transformer: TwoWayTransformer, cache: CachedImageTokens, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward`` for prompt tokens ``(P, T, C)`` on cached images (batch P or 1).

    Returns:
        queries ``(P, T, C)`` and image tokens ``(P, N, C)``, as segment-anything's forward does.
    """
    queries, keys, query_pe, key_pe = point_embedding, cache.keys, point_embedding, cache.key_pe
    for index, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)

        q = queries + query_pe
        if index == 0:
            keys_with_pe = None  # only the cached projections of the first layer's image tokens are needed
            attn_out = _cached_attention(
                layer.cross_attn_token_to_image, layer.cross_attn_token_to_image.q_proj(q),
                cache.token_to_image_keys, cache.token_to_image_values,
            )
        else:
            keys_with_pe = keys + key_pe
            attn_out = _tokens_to_image(layer.cross_attn_token_to_image, q, keys_with_pe, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        q = queries + query_pe
        image_queries = cache.image_to_token_queries if index == 0 else None
        attn_out = _image_to_tokens(layer.cross_attn_image_to_token, keys_with_pe, q, queries, image_queries)
        keys = layer.norm4(keys + attn_out)

    q = queries + query_pe
    queries = queries + _tokens_to_image(transformer.final_attn_token_to_image, q, keys + key_pe, keys)
    return transformer.norm_final_attn(queries), keys


def _cached_attention(attn: Attention, q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """segment-anything's ``Attention`` with the key and value projections already done (``(B, heads, N, c)``)."""
    q = attn._separate_heads(q, attn.num_heads)
    probs = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(attn._recombine_heads(probs @ values))


def _tokens_to_image(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``attn(q, k, v)`` for few queries ``(P, T, C)`` and many keys/values ``(P, N, C)``, projections moved to the query side."""
    heads = attn.num_heads
    head_dim = attn.internal_dim // heads
    num_prompts, num_tokens, channels = q.shape
    q_heads = attn._separate_heads(attn.q_proj(q), heads)  # (P, heads, T, c)
    # (q W_k,h) x^T: the key projection applied to the queries; its bias adds a constant per row, which softmax ignores.
    q_in_key_space = q_heads @ attn.k_proj.weight.reshape(heads, head_dim, channels)  # (P, heads, T, C)
    scores = q_in_key_space.reshape(num_prompts, heads * num_tokens, channels) @ k.transpose(1, 2)
    probs = torch.softmax(scores / math.sqrt(head_dim), dim=-1)  # (P, heads * T, N)
    mixed = (probs @ v).view(num_prompts, heads, num_tokens, channels)
    # Rows of probs sum to one, so the value bias passes through as is.
    out = mixed @ attn.v_proj.weight.reshape(heads, head_dim, channels).transpose(1, 2) + attn.v_proj.bias.view(heads, 1, head_dim)
    return attn.out_proj(attn._recombine_heads(out))


def _image_to_tokens(attn: Attention, image: Optional[Tensor], k: Tensor, v: Tensor, image_queries: Optional[Tensor] = None) -> Tensor:
    """``attn(image, k, v)`` for many image queries ``(P, N, C)`` over few tokens ``(P, T, C)``, projections moved to the token side.

    ``image_queries`` is ``attn.q_proj(image)`` split in heads, ``(B, heads, N, c)``, where it is cached
    (``image`` is then unused).
    """
    heads = attn.num_heads
    k_heads = attn._separate_heads(attn.k_proj(k), heads)  # (P, heads, T, c)
    num_prompts, _, num_tokens, head_dim = k_heads.shape
    channels = attn.out_proj.out_features
    if image_queries is not None:
        scores = (image_queries @ k_heads.transpose(-1, -2)).transpose(1, 2)  # (P, N, heads, T)
    else:
        # (x W_q,h^T + b_q,h) k_h^T = x (W_q,h^T k_h^T) + b_q,h k_h^T: the query projection applied to the keys.
        k_in_image_space = attn.q_proj.weight.reshape(heads, head_dim, channels).transpose(1, 2) @ k_heads.transpose(-1, -2)
        k_bias = attn.q_proj.bias.view(heads, 1, head_dim) @ k_heads.transpose(-1, -2)  # (P, heads, 1, T)
        scores = image @ k_in_image_space.permute(0, 2, 1, 3).reshape(num_prompts, channels, heads * num_tokens)
        scores = (scores + k_bias.reshape(num_prompts, 1, heads * num_tokens)).unflatten(-1, (heads, num_tokens))
    probs = torch.softmax(scores / math.sqrt(head_dim), dim=-1)
    # sum_h probs_h (v_h W_o,h^T): the output projection applied to the token values.
    v_heads = attn._separate_heads(attn.v_proj(v), heads)
    values_out = v_heads @ attn.out_proj.weight.reshape(channels, heads, head_dim).permute(1, 2, 0)  # (P, heads, T, C)
    return probs.flatten(2) @ values_out.flatten(1, 2) + attn.out_proj.bias

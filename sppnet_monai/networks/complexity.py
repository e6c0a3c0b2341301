"""Parameter and multiply-accumulate counts, as reported in the paper's tables."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "network_info"]


def count_macs(net: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one ``net(example)`` call (torch's FLOP counter counts 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    # Not under no_grad: the counter's module hooks need autograd graphs. Dropping the tensors saved for
    # backward keeps memory at inference level (SAM ViT-H at 1024 would otherwise need over 24 GiB).
    with counter, torch.autograd.graph.saved_tensors_hooks(lambda _: None, lambda _: None):
        net(example)
    return counter.get_total_flops() // 2


def network_info(net: nn.Module, image_size: int) -> dict:
    """Parameter count (total and per top-level module) and GMACs of ``net`` on one
    ``(1, net.in_channels, image_size, image_size)`` input with a click in the middle."""
    example = torch.zeros(1, net.in_channels, image_size, image_size)
    example[0, 3, image_size // 2, image_size // 2] = 1.0
    # Counted as trained, on a copy (batch norms update in training mode): the architecture the paper
    # counts, with segment-anything's own decoder forward instead of eval mode's cheaper per-click path.
    macs = count_macs(copy.deepcopy(net).train(), example)
    params = sum(p.numel() for p in net.parameters())
    return {
        "network": type(net).__name__,
        "image_size": image_size,
        "parameters": params,
        "parameters_M": round(params / 1e6, 3),
        "gmacs": round(macs / 1e9, 3),
        "parameters_by_module": {name: sum(p.numel() for p in m.parameters()) for name, m in net.named_children()},
    }

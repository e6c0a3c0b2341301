"""Device, threads and pretrained weights for bundle runs."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import torch
from torch import nn

from sppnet_monai.networks.checkpoints import load_checkpoint, read_recipe, read_state_dict
from sppnet_monai.utils import SPPNetError

logger = logging.getLogger(__name__)


def compute_device() -> torch.device:
    """The CUDA device of this process (torchrun's LOCAL_RANK, else the first) when there is one, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def use_all_cpu_cores() -> int:
    """Let CPU runs use every core (torch's default may be fewer); returns the thread count."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next tensor instead of returning it to the system.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed, so each large
    activation (a 1024x1024 image gives many of 64 MiB) costs thousands of page faults: that made
    elementwise layers such as GELU 3-7x slower than their arithmetic on CPU. With this setting the
    process (and the data-loader workers it forks) keeps its peak memory for reuse, as PyTorch's
    CUDA caching allocator does on GPU. It lasts for the life of the process. Returns False where
    the C library is not glibc or refuses the setting (nothing changes there).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl also has a mallopt, which does nothing
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    largest_int = 2**31 - 1
    libc.mallopt(m_trim_threshold, largest_int)
    return bool(libc.mallopt(m_mmap_threshold, largest_int // 2))


def load_pretrained(net: nn.Module, mobilesam_checkpoint: str | None = None, sam_checkpoint: str | None = None) -> nn.Module:
    """Start ``net`` from public weights where the user has them, as the paper does.

    MobileSAM's ``mobile_sam.pt`` fills the Tiny-ViT encoder, prompt encoder and mask decoder; SAM's
    ``sam_vit_*.pth``, if also given, then replaces the prompt encoder and mask decoder (the paper
    takes those from SAM). Without either, training starts from random weights.
    """
    for path, kind in ((mobilesam_checkpoint, "mobile_sam"), (sam_checkpoint, "sam")):
        if path:
            load_checkpoint(net, path, kind=kind)
            logger.info("loaded %s weights from %s", kind, path)
    return net


# SPPNet's transformers: the Tiny-ViT image encoder and SAM's two-way transformer (parameter-name prefixes).
TRANSFORMER_PREFIXES = ("image_encoder.", "mask_decoder.transformer.")


def parameter_groups(net: nn.Module, learning_rate: float, transformer_lr_factor: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups: the transformers' parameters (:data:`TRANSFORMER_PREFIXES`) at
    ``learning_rate * transformer_lr_factor``, every other one at ``learning_rate``.

    One group (every parameter, as ``net.parameters()`` gives them) when the factor is 1 or ``net`` has no
    transformer (the U-Net baseline), so the optimizer state of earlier runs still resumes.
    """
    if not transformer_lr_factor > 0:
        raise SPPNetError(f"transformer_lr_factor must be above 0, got {transformer_lr_factor!r}")
    named = list(net.named_parameters())
    transformer = [param for name, param in named if name.startswith(TRANSFORMER_PREFIXES)]
    if transformer_lr_factor == 1 or not transformer:
        return [{"params": [param for _, param in named], "lr": learning_rate}]
    rest = [param for name, param in named if not name.startswith(TRANSFORMER_PREFIXES)]
    return [{"params": rest, "lr": learning_rate}, {"params": transformer, "lr": learning_rate * transformer_lr_factor}]


_REQUIRED = object()


def trained_setting(checkpoint: str, key: str, default: object = _REQUIRED) -> object:
    """``key`` of the recipe ``checkpoint`` was trained with: configs build the network from it.

    ``inference.json`` sets ``image_size`` and ``fusion`` this way, so a model trained at 256 runs at
    256 without being told; an explicit override replaces the expression and :func:`load_trained`
    then refuses a contradiction. Without a recorded recipe (checkpoints saved before sppnet_monai
    0.2) ``default`` is used, or, for settings with none, an error asks for the value.
    """
    recipe = _recorded_recipe(checkpoint)
    if key in recipe:
        return recipe[key]
    if default is _REQUIRED:
        raise SPPNetError(f"checkpoint {checkpoint} does not record its {key} (saved before sppnet_monai 0.2): give it, e.g. --{key} 256")
    return default


def _recorded_recipe(checkpoint: str) -> dict:
    """:func:`read_recipe` once per file version: a config asks for each setting (7 loads of the weights otherwise)."""
    try:
        stat = os.stat(checkpoint)
    except OSError:
        return read_recipe(checkpoint)  # its one-line error names the file
    return _recipe_of_version(str(checkpoint), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _recipe_of_version(checkpoint: str, mtime_ns: int, size: int) -> dict:
    return read_recipe(checkpoint)


def load_trained(net: nn.Module, checkpoint: str) -> nn.Module:
    """Load this project's trained weights (e.g. the bundle's ``models/model.pt``) into ``net``, strictly.

    Raises SPPNetError when the checkpoint's recorded recipe contradicts how ``net`` was built.
    """
    load_checkpoint(net, checkpoint, kind="sppnet")
    logger.info("loaded SPPNet weights from %s", checkpoint)
    return net


def load_state_dict_file(net: nn.Module, checkpoint: str) -> nn.Module:
    """Load a plain state dict saved by the bundle's trainer (e.g. the U-Net baseline's ``model.pt``) into ``net``, strictly."""
    state = read_state_dict(checkpoint)  # one line for a missing or unreadable file
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise SPPNetError(f"checkpoint {checkpoint} does not fit {type(net).__name__}: {str(err).splitlines()[0]}") from err
    return net

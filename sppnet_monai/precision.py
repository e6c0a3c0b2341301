"""The one precision rule of training and inference: CUDA autocast with ``amp``, bfloat16 autocast on CPUs built for it."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["autocast", "cpu_has_bf16"]

# CPU flags (Linux /proc/cpuinfo) of native bfloat16 matrix units: AVX-512 BF16 and AMX. Without them oneDNN
# emulates bfloat16 and autocast is slower than float32.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True on a CPU with native bfloat16 units (AVX-512 BF16 or AMX), where CPU autocast pays (read once from /proc/cpuinfo)."""
    # torch exposes no public query for these flags; /proc/cpuinfo is where Linux lists them.
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in _BF16_FLAGS)


def autocast(device: torch.device | str, amp: bool = False, cpu_bf16: bool = False) -> torch.autocast:
    """The autocast context for running a network on ``device``.

    - CUDA: float16 autocast when ``amp`` (the bundles' ``amp`` setting, MONAI's engines' own rule);
    - CPU: bfloat16 autocast when ``cpu_bf16`` and the CPU has bfloat16 units (:func:`cpu_has_bf16`);
    - otherwise float32 (a disabled context).
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.autocast("cuda", enabled=bool(amp))
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cpu_bf16) and device_type == "cpu" and cpu_has_bf16())

"""Sliding-window inference where every window carries a prompt."""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep

from sppnet_monai.networks.sppnet import SPPNet, denormalize_rgb
from sppnet_monai.precision import autocast
from sppnet_monai.transforms import choose_clicks
from sppnet_monai.transforms.stain import stained_pixels
from sppnet_monai.utils import SPPNetError

__all__ = ["GLASS_LOGIT", "CPUAutocastInferer", "PromptedSlidingWindowInferer", "WindowLogitCache", "window_grid"]

# The logit of a skipped glass window: the shipped network's mean logit on blank glass windows is -45 to -63.
GLASS_LOGIT = -50.0


class CPUAutocastInferer(Inferer):
    """Run ``inferer`` under bfloat16 autocast on a CPU with bfloat16 units (:func:`sppnet_monai.precision.autocast`).

    MONAI's engines autocast only on CUDA (their ``amp``); this wrapper is their CPU counterpart, so the
    bundle's trainer and evaluator take ``cpu_bf16`` as they take ``amp``. Logits come back as float32, so
    losses and metrics run in float32. On CUDA inputs it changes nothing.

    Args:
        inferer: the wrapped inferer (``SimpleInferer``, :class:`PromptedSlidingWindowInferer`, ...).
        cpu_bf16: the bundle's switch; False runs float32.
    """

    def __init__(self, inferer: Inferer, cpu_bf16: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.cpu_bf16 = bool(cpu_bf16)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.device.type != "cpu":
            return self.inferer(inputs, network, *args, **kwargs)
        with autocast(inputs.device, cpu_bf16=self.cpu_bf16):
            logits = self.inferer(inputs, network, *args, **kwargs)
        return logits.float()


class PromptedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's :class:`SlidingWindowInferer` for SPPNet's 5-channel input.

    A user's click lands in the windows that contain it; any window whose positive (or negative)
    click map is empty gets a click chosen from its own pixels by
    :func:`~sppnet_monai.transforms.choose_clicks`, so SPPNet always sees a prompt like those it
    was trained with; a window without nucleus-like pixels gets no positive click (SAM's padding
    point). An image that fits one window goes to an SPPNet as it is (SPPNet pads it), so its logits
    are exactly the network's, with no blending; other networks (the U-Net baseline) get MONAI's padding.

    With ``min_stain_density``, an SPPNet skips the windows of bare glass, the background of a slide:
    those with fewer than ``min_stain_pixels`` pixels whose optical density (``-log10(I / 255)``) reaches
    it in some channel. They get :data:`GLASS_LOGIT` (no nucleus) without running the network, which on
    glass costs the time of a tissue window and can only add false nuclei.

    A call given a ``window_cache`` (:class:`WindowLogitCache`) runs only the windows it does not hold:
    slide tiles (:class:`~sppnet_monai.slide_inference.SlideSegmenter`) share windows with their neighbours.

    Args:
        min_stain_density: optical density below which a pixel is unstained (None: run every window).
            Macenko et al. (ISBI 2009) drop pixels under 0.15 as transparent; nuclei are far denser.
        min_stain_pixels: stained pixels a window needs to be run (at least the smallest nucleus kept).
        kwargs: :class:`SlidingWindowInferer` arguments (``roi_size``, ``overlap``, ``mode``, ...).
    """

    def __init__(self, *args: Any, min_stain_density: float | None = None, min_stain_pixels: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if min_stain_density is not None and (isinstance(min_stain_density, bool) or not isinstance(min_stain_density, (int, float)) or min_stain_density <= 0):
            raise SPPNetError(f"min_stain_density must be a positive optical density or None, got {min_stain_density!r}.")
        if isinstance(min_stain_pixels, bool) or not isinstance(min_stain_pixels, int) or min_stain_pixels < 1:
            raise SPPNetError(f"min_stain_pixels must be a positive number of pixels, got {min_stain_pixels!r}.")
        self.min_stain_density = min_stain_density
        self.min_stain_pixels = min_stain_pixels

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, window_cache: WindowLogitCache | None = None, **kwargs: Any
    ):
        if isinstance(network, SPPNet) and self.min_stain_density is not None:
            prompted = lambda windows, *a, **k: self._run_stained(windows, network, *a, **k)  # noqa: E731
        else:
            prompted = lambda windows, *a, **k: network(self.prompt_windows(windows), *a, **k)  # noqa: E731
        if window_cache is not None:
            prompted = window_cache.wrap(prompted, network)
        roi_size = ensure_tuple_rep(self.roi_size, inputs.ndim - 2)
        if isinstance(network, SPPNet) and all(size <= roi for size, roi in zip(inputs.shape[2:], roi_size)):
            return prompted(inputs, *args, **kwargs)  # SPPNet pads a small image itself, as in training
        return super().__call__(inputs, prompted, *args, **kwargs)

    def _run_stained(self, windows: torch.Tensor, network: SPPNet, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``network``'s logits (float32) for the stained windows of ``(B, 5, h, w)``, :data:`GLASS_LOGIT` for the others."""
        stained = self.stained_windows(windows[:, :3])
        if bool(stained.all()):
            return network(self.prompt_windows(windows), *args, **kwargs).float()
        logits = windows.new_full((windows.shape[0], network.out_channels, *windows.shape[2:]), GLASS_LOGIT, dtype=torch.float32)
        if bool(stained.any()):
            logits[stained] = network(self.prompt_windows(windows[stained]), *args, **kwargs).float()
        return logits

    def stained_windows(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which SAM-normalised ``(B, 3, h, w)`` windows hold stain (see the class)."""
        dense = stained_pixels(denormalize_rgb(rgb.float()), self.min_stain_density, channel_dim=1)  # (B, h, w)
        return dense.flatten(1).sum(dim=1) >= self.min_stain_pixels

    @staticmethod
    def prompt_windows(windows: torch.Tensor) -> torch.Tensor:
        """``(B, 5, h, w)`` windows with a click chosen for every empty click map."""
        empty = windows[:, 3:5].flatten(2).amax(dim=2) <= 0  # (B, 2)
        if not empty.any():
            return windows
        windows = windows.clone()
        for index in torch.nonzero(empty.any(dim=1)).flatten().tolist():
            rgb = denormalize_rgb(windows[index, :3].float().cpu())
            for channel, clicks in enumerate(choose_clicks(rgb.numpy()), start=3):
                if empty[index, channel - 3] and clicks:
                    x, y = clicks[0]
                    windows[index, channel, y, x] = 1.0
        return windows


class WindowLogitCache:
    """The least recently used window logits of one network, up to ``max_mib`` MiB, keyed by the window's bytes.

    A key is the whole network input of the window (pixels and click maps), so a window comes back only
    with the prompts it was computed with. Entries belong to the network of the last call: another network
    empties the cache. Used under ``torch.no_grad()`` with weights that no longer change (inference); with
    gradients on, or extra network arguments, calls go straight to the network. Not thread-safe (the app
    calls it under its lock). MONAI's caches hold data, not predictions, and ``functools.lru_cache``
    cannot key on tensors: hence this one. A BLAKE2 digest of a 5 x 256 x 256 window costs about 1 ms on
    the CPU, against about 70 ms for the network there.
    """

    def __init__(self, max_mib: float = 128) -> None:
        if isinstance(max_mib, bool) or not isinstance(max_mib, (int, float)) or max_mib < 0:
            raise SPPNetError(f"window_cache_mib must be a non-negative number of MiB, got {max_mib!r}.")
        self.max_bytes = int(max_mib * 2**20)
        self.hits = self.misses = 0
        self._logits: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._network: weakref.ref | None = None

    def __len__(self) -> int:
        return len(self._logits)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._logits.clear()
        self._bytes = 0

    def wrap(self, run: Callable[..., torch.Tensor], network: Any) -> Callable[..., torch.Tensor]:
        """``run`` (windows ``(B, C, h, w)`` to logits ``(B, M, h, w)``) of ``network``, computing only the windows not held."""
        if self._network is None or self._network() is not network:
            self.clear()
            self._network = weakref.ref(network)

        def cached(windows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or torch.is_grad_enabled() or not self.max_bytes:
                return run(windows, *args, **kwargs)
            keys = [(tuple(window.shape), hashlib.blake2b(window.cpu().numpy().tobytes(), digest_size=16).digest()) for window in windows]
            missing = [index for index, key in enumerate(keys) if key not in self._logits]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            computed = dict(zip(missing, run(windows[missing]).detach())) if missing else {}
            if len(computed) > 1:  # a kept window must not hold its whole batch's output in memory
                computed = {index: logit.clone() for index, logit in computed.items()}
            logits = []
            for index, key in enumerate(keys):
                if index in computed:
                    if key not in self._logits:  # the same window twice in one batch is stored once
                        self._bytes += computed[index].numel() * computed[index].element_size()
                    self._logits[key] = computed[index]
                else:
                    self._logits.move_to_end(key)
                logits.append(self._logits[key])
            while self._bytes > self.max_bytes and self._logits:
                _, dropped = self._logits.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
            return torch.stack(logits)

        return cached


def window_grid(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``SlidingWindowInferer`` visits on an image of ``shape`` (H, W), as slices of it."""
    roi = [min(int(r), int(s)) for r, s in zip(roi_size, shape)]  # the inferer pads a smaller image to one window
    # MONAI's own scan-interval rule (private in monai.inferers.utils), so the grid is exactly the inferer's.
    interval = _get_scan_interval(tuple(shape), tuple(roi), len(shape), ensure_tuple_rep(overlap, len(shape)))
    return [tuple(window) for window in dense_patch_slices(tuple(shape), tuple(roi), interval, return_slice=True)]

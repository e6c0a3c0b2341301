"""Sliding-window inference where every window carries a prompt."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep

from sppnet_monai.networks.sppnet import SPPNet, denormalize_rgb
from sppnet_monai.transforms import choose_clicks
from sppnet_monai.utils import SPPNetError

__all__ = ["GLASS_LOGIT", "PromptedSlidingWindowInferer", "WindowLogitCache", "window_grid"]

# The logit of a skipped glass window: the shipped network's mean logit on blank glass windows is -45 to -63.
GLASS_LOGIT = -50.0


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

    Args:
        min_stain_density: optical density below which a pixel is unstained (None: run every window).
            Macenko et al. (ISBI 2009) drop pixels under 0.15 as transparent; nuclei are far denser.
    With ``window_cache_size``, the logits of the last windows computed are kept, keyed by the window's
    content (pixels and click maps) and the network: a window met again, as the tiles of a slide meet
    the windows of their neighbours' context, is not run twice. Only for a network whose weights no
    longer change (inference); the cache holds ``window_cache_size`` windows' logits.

    Args:
        min_stain_density: optical density below which a pixel is unstained (None: run every window).
            Macenko et al. (ISBI 2009) drop pixels under 0.15 as transparent; nuclei are far denser.
        min_stain_pixels: stained pixels a window needs to be run (at least the smallest nucleus kept).
        window_cache_size: windows whose logits are kept (0: none).
        kwargs: :class:`SlidingWindowInferer` arguments (``roi_size``, ``overlap``, ``mode``, ...).
    """

    def __init__(
        self, *args: Any, min_stain_density: float | None = None, min_stain_pixels: int = 10, window_cache_size: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.min_stain_density = min_stain_density
        self.min_stain_pixels = int(min_stain_pixels)
        self.window_cache = WindowLogitCache(window_cache_size)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any):
        if isinstance(network, SPPNet) and self.min_stain_density is not None:
            prompted = lambda windows, *a, **k: self._run_stained(windows, network, *a, **k)  # noqa: E731
        else:
            prompted = lambda windows, *a, **k: network(self.prompt_windows(windows), *a, **k)  # noqa: E731
        if self.window_cache.capacity:
            prompted = self.window_cache.wrap(prompted, network)
        roi_size = ensure_tuple_rep(self.roi_size, inputs.ndim - 2)
        if isinstance(network, SPPNet) and all(size <= roi for size, roi in zip(inputs.shape[2:], roi_size)):
            return prompted(inputs, *args, **kwargs)  # SPPNet pads a small image itself, as in training
        return super().__call__(inputs, prompted, *args, **kwargs)

    def _run_stained(self, windows: torch.Tensor, network: SPPNet, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``network``'s logits for the stained windows of ``(B, 5, h, w)``, :data:`GLASS_LOGIT` for the others."""
        stained = self.stained_windows(windows[:, :3])
        if bool(stained.all()):
            return network(self.prompt_windows(windows), *args, **kwargs)
        logits = windows.new_full((windows.shape[0], network.out_channels, *windows.shape[2:]), GLASS_LOGIT)
        if bool(stained.any()):
            logits[stained] = network(self.prompt_windows(windows[stained]), *args, **kwargs).to(logits.dtype)
        return logits

    def stained_windows(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which SAM-normalised ``(B, 3, h, w)`` windows hold stain (see the class)."""
        # I < 255 * 10**-d  <=>  -log10(I / 255) > d, in any channel.
        darkest = denormalize_rgb(rgb.float()).amin(dim=1)  # (B, h, w)
        dense = darkest < 255.0 * 10.0 ** (-self.min_stain_density)
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
    """Least-recently-used logits of network windows, keyed by the window's bytes and the network.

    MONAI's caches hold data, not predictions, and ``functools.lru_cache`` cannot key on tensors: hence
    this one. A 128-bit BLAKE2 digest of a 5 x 256 x 256 window costs about a millisecond, the network 70.
    """

    def __init__(self, capacity: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise SPPNetError(f"window_cache_size must be a non-negative number of windows, got {capacity!r}.")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._logits: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logits)

    def clear(self) -> None:
        self._logits.clear()

    def wrap(self, run: Callable[..., torch.Tensor], network: Any) -> Callable[..., torch.Tensor]:
        """``run`` (windows ``(B, C, h, w)`` to logits ``(B, M, h, w)``), computing only the windows not cached."""

        def cached(windows: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            keys = [(id(network), tuple(window.shape), hashlib.blake2b(window.cpu().numpy().tobytes(), digest_size=16).digest()) for window in windows]
            missing = [index for index, key in enumerate(keys) if key not in self._logits]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            computed = dict(zip(missing, run(windows[missing], *args, **kwargs))) if missing else {}
            if len(computed) > 1:  # a kept window must not hold its whole batch's output in memory
                computed = {index: logit.clone() for index, logit in computed.items()}
            logits = []
            for index, key in enumerate(keys):
                if index in computed:
                    self._logits[key] = computed[index]
                else:
                    self._logits.move_to_end(key)
                logits.append(self._logits[key])
            while len(self._logits) > self.capacity:
                self._logits.popitem(last=False)
            return torch.stack(logits)

        return cached


def window_grid(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``SlidingWindowInferer`` visits on an image of ``shape`` (H, W), as slices of it."""
    roi = [min(int(r), int(s)) for r, s in zip(roi_size, shape)]  # the inferer pads a smaller image to one window
    # MONAI's own scan-interval rule (private in monai.inferers.utils), so the grid is exactly the inferer's.
    interval = _get_scan_interval(tuple(shape), tuple(roi), len(shape), ensure_tuple_rep(overlap, len(shape)))
    return [tuple(window) for window in dense_patch_slices(tuple(shape), tuple(roi), interval, return_slice=True)]

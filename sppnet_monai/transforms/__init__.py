"""MONAI dictionary transforms for SPPNet: RGB conversion, single-point prompt sampling, click channels.

Conventions: images are channel-first (C, H, W) with H = rows and W = columns (``LoadImaged(...,
reader="PILReader", reverse_indexing=False, ensure_channel_first=True)``); clicks are (x, y) = (column, row)
pairs in ``d["foreground"]`` / ``d["background"]``; the network input is (5, H, W): SAM-normalised RGB
(``NormalizeIntensityd``), then the positive and the negative click maps.
"""

from .auto_click import AutoClickd, choose_clicks, hematoxylin_mask
from .image import EnsureRGB, EnsureRGBd
from .prompt import AddClickGuidanceChannelsd, CenterNeighborhoodPointSampled, nucleus_center
from .stain import RandHEDJitter, RandHEDJitterd
from .targets import NucleiInstanceTarget, NucleiInstanceTargetd, hover_maps, normalised_distance

__all__ = [
    "AddClickGuidanceChannelsd",
    "AutoClickd",
    "CenterNeighborhoodPointSampled",
    "choose_clicks",
    "EnsureRGB",
    "EnsureRGBd",
    "hematoxylin_mask",
    "NucleiInstanceTarget",
    "NucleiInstanceTargetd",
    "hover_maps",
    "normalised_distance",
    "RandHEDJitter",
    "RandHEDJitterd",
    "nucleus_center",
]

from sppnet_monai.networks.image_encoder import TinyViTImageEncoder
from sppnet_monai.networks.llsie import LLSIE
from sppnet_monai.networks.mask_decoder import FUSION_MODES, SPPMaskDecoder
from sppnet_monai.networks.sppnet import (
    INSTANCE_CHANNEL,
    INSTANCE_HEADS,
    MASK_CHANNEL,
    PIXEL_MEAN,
    PIXEL_STD,
    RECIPE_DEFAULTS,
    RECIPE_KEYS,
    ImageFeatures,
    SPPNet,
    SPPNetOutput,
    check_image_size,
    clicked_channel,
    clicks_from_guidance,
    denormalize_rgb,
    instance_channels,
)

__all__ = [
    "FUSION_MODES",
    "INSTANCE_CHANNEL",
    "INSTANCE_HEADS",
    "MASK_CHANNEL",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "RECIPE_DEFAULTS",
    "RECIPE_KEYS",
    "ImageFeatures",
    "LLSIE",
    "SPPMaskDecoder",
    "SPPNet",
    "SPPNetOutput",
    "TinyViTImageEncoder",
    "check_image_size",
    "clicked_channel",
    "clicks_from_guidance",
    "denormalize_rgb",
    "instance_channels",
]

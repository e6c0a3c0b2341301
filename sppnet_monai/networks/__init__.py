from sppnet_monai.networks.image_encoder import TinyViTImageEncoder
from sppnet_monai.networks.llsie import LLSIE
from sppnet_monai.networks.mask_decoder import FUSION_MODES, SPPMaskDecoder
from sppnet_monai.networks.sppnet import ImageFeatures, SPPNet, SPPNetOutput, clicks_from_guidance

__all__ = [
    "FUSION_MODES",
    "ImageFeatures",
    "LLSIE",
    "SPPMaskDecoder",
    "SPPNet",
    "SPPNetOutput",
    "TinyViTImageEncoder",
    "clicks_from_guidance",
]

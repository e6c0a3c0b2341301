"""SPPNet: a single-point prompt network for nuclei segmentation, packaged for MONAI."""

__version__ = "0.9.4"

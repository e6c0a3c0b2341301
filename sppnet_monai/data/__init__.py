"""Data preparation: MoNuSeg, generic image/mask folders and the synthetic demo dataset.

Each entry point writes ``DST/images/<name>.png`` (RGB uint8), ``DST/labels/<name>.png``
(uint16 instance map, 0 = background) and a MONAI datalist ``DST/datalist.json``.
"""

from sppnet_monai.data.prepare import prepare_demo, prepare_folder, prepare_monuseg

__all__ = ["prepare_demo", "prepare_folder", "prepare_monuseg"]

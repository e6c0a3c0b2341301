"""``python -m sppnet_monai predict``: nuclei masks and instance maps for images of any size.

The pipeline is the bundle's own ``inference.json`` (preprocessing, network, prompted sliding-window
inferer), so the CLI and ``python -m monai.bundle run`` with that config give the same masks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import AsDiscrete
from tqdm import tqdm

from sppnet_monai.data.image_io import write_png
from sppnet_monai.postprocess import instances_from_head, instances_from_semantic
from sppnet_monai.utils import SPPNetError, atomic_path, root_message, user_error
from sppnet_monai.workflows.datasets import image_entry, read_clicks_file
from sppnet_monai.workflows.setup import reuse_freed_memory

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
OUTPUT_FORMATS = ("png", "tif", "nii")


def find_images(inputs: str | Sequence[str]) -> list[str]:
    """Image files named by ``inputs``: files, and the images directly inside folders, sorted."""
    found: list[str] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(str(path))
        else:
            raise SPPNetError(f"{path} does not exist.")
    if not found:
        raise SPPNetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {inputs}.")
    return found


class Predictor:
    """A trained SPPNet with the bundle's inference pipeline, loaded once: the one pixel path.

    ``predict``, ``evaluate``, the MONAI Label app and ``python -m monai.bundle run`` with
    ``inference.json`` all run the config's ``load_image`` and ``prompt_preprocessing`` transforms, its
    ``network`` and ``inferer``, and its threshold rule (MONAI's ``AsDiscrete``), so the same image and
    clicks give the same mask on every path.

    Args:
        checkpoint: trained weights; None uses the config's own ``checkpoint`` (``models/model.pt`` of
            the config's bundle folder). The network is built from the recipe the checkpoint records
            (``image_size``, ``fusion``).
        config: the bundle inference config (or a list of configs, merged in order); its ids (``image_size``, ``sw_overlap``, ``threshold``,
            ``instance_postprocess``, ...) may be overridden.

    Loading one also makes the process keep freed memory for reuse (:func:`reuse_freed_memory`).
    """

    def __init__(
        self, checkpoint: str | None = None, config: str | os.PathLike | Sequence[str | os.PathLike] = DEFAULT_CONFIG, **overrides
    ) -> None:
        configs = [config] if isinstance(config, (str, os.PathLike)) else list(config)
        for path in configs:
            if not Path(path).is_file():
                raise SPPNetError(f"inference config {path} not found; pass --config path/to/bundle/configs/inference.json")
        reuse_freed_memory()
        parser = ConfigParser()
        parser.read_config([str(path) for path in configs])
        # The config's relative paths (its default checkpoint) belong to its bundle folder.
        bundle_root = str(Path(configs[0]).resolve().parents[1])
        parser.update({"bundle_root": bundle_root, **({"checkpoint": str(checkpoint)} if checkpoint else {}), **overrides})
        self.parser = parser
        try:
            self.checkpoint = parser.get_parsed_content("checkpoint")
            self.device = parser.get_parsed_content("device")
            self.network = parser.get_parsed_content("network").eval()
            self.load_image = parser.get_parsed_content("load_image")
            self.prompt_preprocessing = parser.get_parsed_content("prompt_preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            self.threshold = float(parser.get_parsed_content("threshold"))
            self.amp = bool(parser.get_parsed_content("amp"))
        except Exception as err:  # MONAI's parser wraps the user's error (a bad checkpoint, size...) in its own
            cause = user_error(err)
            if cause is None:
                raise
            raise cause from None
        self.discretize = AsDiscrete(threshold=self.threshold)
        self.instance_postprocess = dict(parser.get_parsed_content("instance_postprocess"))
        self.head_postprocess = dict(parser.get_parsed_content("head_postprocess", default={}))
        self.flip_tta = bool(parser.get_parsed_content("flip_tta", default=False))
        self.split_by_head = bool(parser.get_parsed_content("split_by_head", default=True))
        # What the network's second channel is: the config's instance_head, which also built the network.
        self.instance_head = parser.get_parsed_content("instance_head", default=None)

    @property
    def image_size(self) -> int:
        return int(self.network.image_size)

    def prepare(self, entry: dict) -> torch.Tensor:
        """The network input ``(5, H, W)`` of one ``{"image": path, "foreground", "background"}`` entry."""
        return self.prompt(self.load_image(entry))

    def prompt(self, loaded: dict) -> torch.Tensor:
        """The network input ``(5, H, W)`` of ``{"image": (3, H, W) RGB 0-255, "foreground", "background"}``.

        ``loaded["image"]`` is left as it is (``NormalizeIntensityd`` works in place), so a loaded image
        can be prompted again, as the MONAI Label app does with its cached windows.
        """
        return self.prompt_preprocessing({**loaded, "image": loaded["image"].clone()})["image"]

    def autocast(self) -> torch.autocast:
        """The precision bundle inference runs the network in: CUDA autocast when the config's ``amp`` is on."""
        return torch.autocast(self.device.type, enabled=self.amp and self.device.type == "cuda")

    @torch.no_grad()
    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(C, H, W)`` of a prepared ``(5, H, W)`` image (tiled if larger than the network input):
        the nuclei mask, then the instance head's map when the network has one.

        With the config's ``flip_tta``, the mean of the logits of the image and of its three flips
        (clicks flip with it, as channels of the input).
        """
        batch = image[None].to(self.device)
        flips = [(), (-1,), (-2,), (-2, -1)] if self.flip_tta else [()]
        with self.autocast():
            total = sum(self._flip(self.inferer(self._flip(batch, dims), self.network), dims).float() for dims in flips)
        return total[0] / len(flips)

    @staticmethod
    def _flip(tensor: torch.Tensor, dims: tuple) -> torch.Tensor:
        return torch.flip(tensor, dims) if dims else tensor

    def mask(self, logits: torch.Tensor) -> np.ndarray:
        """Nuclei mask ``(H, W)`` bool from logits ``(C, H, W)``: the bundle's sigmoid + threshold rule on channel 0."""
        return self.discretize(torch.sigmoid(logits[:1].float()))[0].cpu().numpy() > 0

    @staticmethod
    def head_map(logits: torch.Tensor) -> np.ndarray | None:
        """The instance head's map ``(H, W)`` float32 (after the sigmoid) from logits ``(C, H, W)``; None without one."""
        return torch.sigmoid(logits[1].float()).cpu().numpy() if logits.shape[0] > 1 else None

    def split_nuclei(self, mask: np.ndarray, head_map: np.ndarray | None = None) -> np.ndarray:
        """Instance label map ``(H, W)`` int32 of ``mask``: watershed seeded by the cores of the instance head's
        ``head_map`` (``head_postprocess``), else, or when the config's ``split_by_head`` is off, by distance
        peaks of the mask (``instance_postprocess``)."""
        if head_map is None or not self.split_by_head or self.instance_head is None:
            return instances_from_semantic(mask, **self.instance_postprocess)
        return instances_from_head(mask, head_map, self.instance_head, **self.head_postprocess)

    def segment(self, image: torch.Tensor) -> np.ndarray:
        """Nuclei mask ``(H, W)`` bool of a prepared ``(5, H, W)`` image."""
        return self.mask(self.logits(image))

    def segment_instances(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Nuclei mask ``(H, W)`` bool and instance label map ``(H, W)`` int32 of a prepared ``(5, H, W)`` image."""
        logits = self.logits(image)
        mask = self.mask(logits)
        return mask, self.split_nuclei(mask, self.head_map(logits))

    def predict(self, entry: dict) -> tuple[np.ndarray, np.ndarray]:
        """Binary nuclei mask ``(H, W)`` bool and instance label map ``(H, W)`` int32."""
        return self.segment_instances(self.prepare(entry))


def write_outputs(output_dir: Path, stem: str, mask: np.ndarray, instances: np.ndarray, formats: Iterable[str]) -> list[str]:
    """Write the mask (0/255 uint8) and the instance map (uint16) in each format; returns the paths."""
    written = []
    for fmt in formats:
        for suffix, array in (("mask", (mask * 255).astype(np.uint8)), ("instances", instances.astype(np.uint16))):
            path = output_dir / f"{stem}_{suffix}.{'nii.gz' if fmt == 'nii' else fmt}"
            if fmt == "png":
                write_png(path, array)
            elif fmt == "tif":
                import tifffile

                with atomic_path(path) as tmp:
                    tifffile.imwrite(tmp, array)
            else:
                import gzip

                import nibabel as nib

                # NIfTI's first axis is x (columns); nibabel picks the format from the name, so the
                # compressed bytes are made here and written under the temporary name.
                nifti = nib.Nifti1Image(np.ascontiguousarray(array.T), np.eye(4))
                with atomic_path(path) as tmp:
                    tmp.write_bytes(gzip.compress(nifti.to_bytes()))
            written.append(str(path))
    return written


def run_predict(
    inputs: str | Sequence[str],
    output_dir: str,
    checkpoint: str | None = None,
    clicks: str | None = None,
    formats: str | Sequence[str] = "png",
    config: str | os.PathLike = DEFAULT_CONFIG,
    **overrides,
) -> dict:
    """Predict every image of ``inputs``; an image that fails is reported and the others go on."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
    if unknown:
        raise SPPNetError(f"unknown output format(s) {unknown}; choose from {OUTPUT_FORMATS}.")
    images = find_images(inputs)
    click_map = read_clicks_file(clicks) if clicks else {}
    predictor = Predictor(checkpoint, config, **overrides)
    out = Path(output_dir)
    summary: dict = {"output_dir": str(out), "images": {}, "failed": {}}
    for image in tqdm(images, desc="predict", unit="image"):
        try:
            mask, instances = predictor.predict(image_entry(image, click_map))
        except Exception as err:  # one bad image must not stop the others
            message = root_message(err)
            logger.warning("%s: skipped: %s", image, message)
            summary["failed"][image] = message
            continue
        files = write_outputs(out, Path(image).stem, mask, instances, formats)
        summary["images"][image] = {"nuclei": int(instances.max()), "nuclei_fraction": round(float(mask.mean()), 4), "files": files}
    if not summary["images"]:
        raise SPPNetError(f"no image could be processed ({len(summary['failed'])} failed; first: {next(iter(summary['failed'].values()), '')}).")
    return summary

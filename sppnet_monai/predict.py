"""``python -m sppnet_monai predict``: nuclei masks and instance maps for images of any size.

The pipeline is the bundle's own ``inference.json`` (preprocessing, network, prompted sliding-window
inferer), so the CLI and ``python -m monai.bundle run`` with that config give the same masks.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage
from monai.bundle import ConfigParser
from monai.transforms import AsDiscrete, Compose
from tqdm import tqdm

from sppnet_monai.clicks import click_pixels, first_in_scan_order
from sppnet_monai.data.image_io import write_png
from sppnet_monai.data.instances import relabel_consecutive
from sppnet_monai.data.slides import Region, Slide, parse_region
from sppnet_monai.inferers import WindowLogitCache
from sppnet_monai.networks.sppnet import INSTANCE_CHANNEL, instance_channels
from sppnet_monai.nuclei import nuclei_records, read_jsonl, write_nuclei
from sppnet_monai.postprocess import instances_from_head, instances_from_semantic
from sppnet_monai.precision import autocast
from sppnet_monai.slide_inference import SlideSegmenter, level_region, tile_grid
from sppnet_monai.transforms import AutoClickd
from sppnet_monai.utils import SPPNetError, atomic_path, root_message, user_error
from sppnet_monai.workflows.datasets import image_entry, read_clicks_file
from sppnet_monai.workflows.setup import reuse_freed_memory

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "inference.json"
# The U-Net baseline's inference: the bundle's pipeline with unet_inference.json's network on top.
UNET_CONFIG = [str(DEFAULT_CONFIG), str(DEFAULT_CONFIG.parent / "unet_inference.json")]
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp") + (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
OUTPUT_FORMATS = ("png", "tif", "nii")  # masks, for images that fit in memory
GEOJSON = "geojson"  # nucleus polygons (QuPath GeoJSON) + their measurements (CSV), for any input


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


class ImagesFailed(SPPNetError):
    """Images of a ``predict`` run that could not be processed: one line each, with its reason.

    ``exit_status`` is 1 when the other images were processed (their outputs are written), 2 when none was.
    """

    def __init__(self, failed: dict[str, str], total: int) -> None:
        self.failed = dict(failed)
        self.exit_status = 2 if len(self.failed) >= total else 1
        # Most reasons (a click outside an image, Pillow's) already name the file: naming it twice reads as noise.
        lines = [reason if image in reason else f"{image}: {reason}" for image, reason in self.failed.items()]
        if total > 1:
            lines.append(
                f"no image could be processed ({total} failed)." if self.exit_status == 2 else f"{len(self.failed)} of {total} images failed."
            )
        super().__init__("\n".join(lines))


# How far (pixels) a click may lie from the piece of the click head's mask it picks: the 5x5 neighbourhood
# of center-neighbourhood sampling and a rim of a few pixels.
CLICK_REACH = 4


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
            self.set_threshold(parser.get_parsed_content("threshold"))
            self.amp = bool(parser.get_parsed_content("amp"))
            self.cpu_bf16 = bool(parser.get_parsed_content("cpu_bf16", default=False))
        except Exception as err:  # MONAI's parser wraps the user's error (a bad checkpoint, size...) in its own
            cause = user_error(err)
            if cause is None:
                raise
            raise cause from None
        # The click encoding without the image-level AutoClickd: on slide tiles every window chooses its own
        # automatic click (the inferer's rule), so that a nucleus does not depend on the tile that saw it.
        self.click_encoding = Compose([t for t in self.prompt_preprocessing.transforms if not isinstance(t, AutoClickd)])
        self.instance_postprocess = dict(parser.get_parsed_content("instance_postprocess"))
        self.head_postprocess = dict(parser.get_parsed_content("head_postprocess", default={}))
        self.slide_inference = dict(parser.get_parsed_content("slide_inference", default={}))  # SlideSegmenter's arguments
        self.flip_tta = bool(parser.get_parsed_content("flip_tta", default=False))
        self.split_by_head = bool(parser.get_parsed_content("split_by_head", default=True))
        # What the network's second channel is: the config's instance_head, which also built the network.
        self.instance_head = parser.get_parsed_content("instance_head", default=None)

    def set_threshold(self, threshold: float) -> None:
        """The probability above which a pixel is nucleus (the config's ``threshold``)."""
        self.threshold = float(threshold)
        self.discretize = AsDiscrete(threshold=self.threshold)

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

    def encode_clicks(self, loaded: dict) -> torch.Tensor:
        """Like :meth:`prompt`, but windows left without a click get theirs from the inferer, not from the whole image."""
        return self.click_encoding({**loaded, "image": loaded["image"].clone()})["image"]

    def autocast(self) -> torch.autocast:
        """The precision bundle inference runs the network in: the config's ``amp`` on CUDA, ``cpu_bf16`` on CPU
        (:func:`sppnet_monai.precision.autocast`)."""
        return autocast(self.device, amp=self.amp, cpu_bf16=self.cpu_bf16)

    @torch.no_grad()
    def logits(self, image: torch.Tensor, window_cache: WindowLogitCache | None = None) -> torch.Tensor:
        """Logits ``(C, H, W)`` of a prepared ``(5, H, W)`` image (tiled if larger than the network input):
        the nuclei mask, then the instance head's map when the network has one.

        With the config's ``flip_tta``, the mean of the logits of the image and of its three flips
        (clicks flip with it, as channels of the input). ``window_cache`` spares windows already computed.
        """
        batch = image[None].to(self.device)
        flips = [(), (-1,), (-2,), (-2, -1)] if self.flip_tta else [()]
        cache = {} if window_cache is None else {"window_cache": window_cache}
        with self.autocast():
            total = sum(self._unflip(self.inferer(self._flip(batch, dims), self.network, **cache).float(), dims) for dims in flips)
        return total[0] / len(flips)

    @staticmethod
    def _flip(tensor: torch.Tensor, dims: tuple) -> torch.Tensor:
        return torch.flip(tensor, dims) if dims else tensor

    def _unflip(self, logits: torch.Tensor, dims: tuple) -> torch.Tensor:
        """Logits ``(B, C, H, W)`` of a flipped image, flipped back. HoVer-Net's maps are offsets with a sign: a flip
        along the columns reverses the horizontal map, along the rows the vertical one, so those change sign too
        (a negated logit is a negated map after ``2 sigmoid - 1``)."""
        logits = self._flip(logits, dims)
        if self.instance_head == "hv" and dims:
            logits = logits.clone()
            for axis, channel in ((-1, INSTANCE_CHANNEL), (-2, INSTANCE_CHANNEL + 1)):
                if axis in dims:
                    logits[:, channel] = -logits[:, channel]
        return logits

    def mask(self, logits: torch.Tensor) -> np.ndarray:
        """Nuclei mask ``(H, W)`` bool from logits ``(C, H, W)``: the bundle's sigmoid + threshold rule on channel 0."""
        return self.discretize(torch.sigmoid(logits[:1].float()))[0].cpu().numpy() > 0

    @property
    def clicked_channel(self) -> int | None:
        """The network's click-head channel (``SPPNet.clicked_channel``); None for a network without one."""
        return getattr(self.network, "clicked_channel", None)

    @torch.no_grad()
    def clicked_logits(self, loaded: dict, clicks: Sequence[Sequence[int]], window: tuple[int, int, int, int], chunk: int = 32) -> torch.Tensor:
        """The click head's logits ``(P, h, w)`` in ``window`` ``(x0, y0, w, h)`` for each positive click of ``clicks``
        (image pixels, inside the window), each with the window's automatic background click.

        ``loaded`` is ``{"image": (3, H, W) RGB 0-255}`` from :attr:`load_image`. The window is encoded once and
        every click decoded against it (``SPPNet.encode`` / ``decode``), ``chunk`` clicks at a time.
        """
        if self.clicked_channel is None:
            raise SPPNetError(f"checkpoint {self.checkpoint} has no click head (recipe click_head): it returns all nuclei, not the clicked one.")
        x0, y0, width, height = window
        rgb = loaded["image"][:, y0 : y0 + height, x0 : x0 + width]
        prepared = self.prompt({"image": rgb, "foreground": [], "background": []})  # the automatic background click
        background = first_in_scan_order(np.argwhere(prepared[4].cpu().numpy() > 0)[:, ::-1]).tolist()
        negative = background[0] if background else [0, 0]  # SAM's padding point (label -1) where there is none
        coords = torch.tensor([[[x - x0, y - y0], negative] for x, y in clicks], dtype=torch.float32).reshape(-1, 2, 2)
        labels = torch.tensor([[1, 0 if background else -1]] * len(clicks)).reshape(-1, 2)
        network = self.network
        out = []
        with self.autocast():
            features = network.encode(prepared[None, :3].to(self.device))
            for start in range(0, len(clicks), chunk):
                decoded = network.decode(features, coords[start : start + chunk].to(self.device), labels[start : start + chunk].to(self.device))
                out.append(decoded.masks[:, self.clicked_channel].float().cpu())
        return torch.cat(out) if out else torch.zeros((0, height, width))

    def clicked_nucleus(self, logits: torch.Tensor, click: Sequence[int]) -> np.ndarray:
        """The nucleus under ``click`` ``(x, y)``, ``(h, w)`` bool, from the click head's logits ``(h, w)``: the bundle's
        threshold rule, then the connected piece that holds the click, else the piece with most pixels within
        ``CLICK_REACH`` pixels of it (a click on a nucleus's rim); empty when none comes that close."""
        pieces, count = ndimage.label(self.discretize(torch.sigmoid(logits[None].float()))[0].cpu().numpy() > 0)
        x, y = int(click[0]), int(click[1])
        rows, cols = np.ogrid[: pieces.shape[0], : pieces.shape[1]]
        near = pieces[((rows - y) ** 2 + (cols - x) ** 2 <= CLICK_REACH**2) & (pieces > 0)]
        if count == 0 or near.size == 0:
            return np.zeros(pieces.shape, dtype=bool)
        chosen = pieces[y, x] if 0 <= y < pieces.shape[0] and 0 <= x < pieces.shape[1] and pieces[y, x] else np.bincount(near).argmax()
        return pieces == chosen

    def clicked_instances(self, logits: torch.Tensor, clicks: Sequence[Sequence[int]]) -> np.ndarray:
        """Instance map ``(h, w)`` int32 of the nuclei under ``clicks`` (``[x, y]`` pixels of the logits), numbered in
        click order, from the logits ``(C, h, w)`` of a network with a click head (a click on a nucleus already
        returned adds nothing): the answer to clicks on nuclei, one by one (NuClick's task)."""
        instances = np.zeros(logits.shape[-2:], dtype=np.int32)
        for click in clicks:
            nucleus = self.clicked_nucleus(logits[self.clicked_channel], click) & (instances == 0)
            if nucleus.any() and instances[int(click[1]), int(click[0])] == 0:
                instances[nucleus] = instances.max() + 1
        return instances

    @staticmethod
    def edit_instances(
        instances: np.ndarray,
        foreground: Sequence[Sequence[int]],
        background: Sequence[Sequence[int]],
        nucleus_at: Callable[[Sequence[int]], np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """``instances`` ``(h, w)`` (all nuclei of an area) corrected by the user's clicks (``[x, y]`` pixels of the
        map): a negative click on a nucleus removes that nucleus; a positive click outside every nucleus adds
        ``nucleus_at(click)`` (``(h, w)`` bool, e.g. from :meth:`clicked_nucleus`; a None result, or no
        ``nucleus_at``, adds nothing). Returns a new map, ids renumbered 1..N in their order."""
        edited = instances.copy()
        for x, y in background:
            if edited[int(y), int(x)] > 0:
                edited[edited == edited[int(y), int(x)]] = 0
        for click in foreground:
            nucleus = nucleus_at(click) if nucleus_at is not None and edited[int(click[1]), int(click[0])] == 0 else None
            if nucleus is not None:
                edited[nucleus & (edited == 0)] = edited.max() + 1
        return relabel_consecutive(edited, dtype=np.int32)

    def head_map(self, logits: torch.Tensor) -> np.ndarray | None:
        """The instance head's maps float32 (after the sigmoid) from logits ``(C, H, W)``: ``(H, W)``, or ``(2, H, W)``
        for ``"hv"``; None for a network without one."""
        maps = instance_channels(self.instance_head)
        if not maps or logits.shape[0] < INSTANCE_CHANNEL + maps:
            return None
        head = torch.sigmoid(logits[INSTANCE_CHANNEL : INSTANCE_CHANNEL + maps].float()).cpu().numpy()
        return head[0] if maps == 1 else head

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


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` under ``torchrun`` (a gloo process group on CPU, NCCL on GPUs), else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _gather(summary: dict, world: int) -> dict:
    """Rank 0's summary merged with every rank's (``torchrun``); the summary itself in one process."""
    if world == 1:
        return summary
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, summary)
    merged = {**summary, "images": {}, "failed": {}, "ranks": world}
    for part in parts:
        merged["images"].update(part["images"])
        merged["failed"].update(part["failed"])
    return merged


def run_predict(
    inputs: str | Sequence[str],
    output_dir: str,
    checkpoint: str | None = None,
    clicks: str | None = None,
    formats: str | Sequence[str] = "png",
    config: str | os.PathLike = DEFAULT_CONFIG,
    region: str | Sequence[int] | None = None,
    level: int = 0,
    tile_size: int | None = None,
    **overrides,
) -> dict:
    """Predict every image of ``inputs``; an image that fails is reported in the summary's ``failed`` and the others go on
    (:class:`ImagesFailed` when none is left).

    Whole-slide images (and any image given ``region`` or ``level``) go tile by tile through
    :mod:`sppnet_monai.slide_inference` into ``geojson`` (GeoJSON + CSV of the nuclei); plain images
    are segmented whole into masks (``png``, ``tif``, ``nii``) and/or ``geojson``. Under ``torchrun``
    each process takes every ``WORLD_SIZE``-th input. The summary ends with the throughput.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - set(OUTPUT_FORMATS) - {GEOJSON})
    if unknown:
        raise SPPNetError(f"unknown output format(s) {unknown}; choose from {OUTPUT_FORMATS + (GEOJSON,)}.")
    region = parse_region(region)
    images = find_images(inputs)
    click_map = read_clicks_file(clicks) if clicks else {}
    rank, world = _distributed()
    predictor = Predictor(checkpoint, config, **overrides)
    out = Path(output_dir)
    summary: dict = {"output_dir": str(out), "images": {}, "failed": {}}
    start, pixels, nuclei = time.perf_counter(), 0, 0
    for image in tqdm(images[rank::world], desc="predict", unit="image", disable=len(images) == 1):
        try:
            with Slide(image) as slide:
                if slide.is_slide or region is not None or level != 0:
                    result = predict_slide(predictor, slide, out, formats, region, level, click_map.get(Path(image).name, {}), tile_size)
                else:
                    result = _predict_image(predictor, image, click_map, out, formats)
        except Exception as err:  # one bad image must not stop the others
            if not isinstance(user_error(err) or err, (SPPNetError, OSError)):
                raise  # a bug, not a bad input
            message = root_message(err)
            # Not a warning: the caller reports the failures (the CLI on stderr, one line each, after the run).
            logger.info("%s: skipped: %s", image, message)
            summary["failed"][image] = message
            continue
        pixels += result.pop("pixels")
        nuclei += result["nuclei"]
        summary["images"][image] = result
    seconds = time.perf_counter() - start
    summary["throughput"] = {
        "seconds": round(seconds, 2),
        "megapixels_per_second": round(pixels / 1e6 / seconds, 3),
        "nuclei_per_second": round(nuclei / seconds, 1),
    }
    summary = _gather(summary, world)
    if not summary["images"]:
        raise ImagesFailed(summary["failed"], len(summary["failed"]))
    logger.info("throughput: %s", summary["throughput"])
    return summary


def _predict_image(predictor: Predictor, image: str, click_map: dict, out: Path, formats: list[str]) -> dict:
    """A plain image segmented whole: masks in the mask formats, nuclei in ``geojson``."""
    mask, instances = predictor.predict(image_entry(image, click_map))
    stem = Path(image).stem
    files = write_outputs(out, stem, mask, instances, [f for f in formats if f != GEOJSON])
    if GEOJSON in formats:
        paths = out / f"{stem}_nuclei.geojson", out / f"{stem}_nuclei.csv"
        write_nuclei(nuclei_records(instances), *paths)
        files += [str(p) for p in paths]
    return {"nuclei": int(instances.max()), "nuclei_fraction": round(float(mask.mean()), 4), "files": files, "pixels": mask.size}


def predict_slide(
    predictor: Predictor,
    slide: Slide,
    out: Path,
    formats: Sequence[str] = (GEOJSON,),
    region: Region | None = None,
    level: int = 0,
    clicks: dict | None = None,
    tile_size: int | None = None,
) -> dict:
    """Nuclei of ``region`` (level-0 pixels; None: the whole slide) read at ``level``, streamed tile by tile into
    ``<stem>_nuclei.geojson`` and ``<stem>_nuclei.csv``.

    Finished tiles are appended to a hidden ``.<stem>_nuclei.partial.jsonl`` as they come; a run stopped
    midway resumes from it (same slide, region, level and settings), and the outputs appear, complete,
    only at the end. Clicks (``{"foreground": [[x, y]], "background": ...}``, level-0 pixels) must lie in the region.
    """
    if set(formats) != {GEOJSON}:
        raise SPPNetError(
            f"{slide.path.name}: whole-slide images and regions are written as --formats geojson (nucleus polygons), "
            f"not as masks {sorted(set(formats) - {GEOJSON})}."
        )
    settings = dict(predictor.slide_inference)
    if tile_size is not None:
        settings["tile_size"] = tile_size
    segmenter = SlideSegmenter(predictor, **settings)
    clicks = clicks or {}
    area, scale = level_region(slide, region, level)
    bounds = region or (0, 0, *slide.size(0))
    for kind in ("foreground", "background"):
        click_pixels(clicks.get(kind, []), bounds[2], bounds[3], kind, f"the region of {slide.path.name}", origin=bounds[:2])
    stem = slide.path.stem
    partial = out / f".{stem}_nuclei.partial.jsonl"
    stat = slide.path.stat()
    header = {
        "slide": str(slide.path.resolve()), "stamp": [stat.st_mtime_ns, stat.st_size], "region": list(bounds), "level": level,
        "settings": settings, "checkpoint": str(predictor.checkpoint), "clicks": clicks,
    }
    done = _resume(partial, header)
    tiles = tile_grid(area, segmenter.tile_size)
    out.mkdir(parents=True, exist_ok=True)
    with open(partial, "a") as log:
        if done == 0:
            log.truncate(0)
            log.write(json.dumps(header) + "\n")
        progress = tqdm(total=len(tiles), initial=done, desc=f"{stem} tiles", unit="tile")
        for index, _, records in segmenter.segment_region(slide, bounds, level, clicks.get("foreground", []), clicks.get("background", []), skip=done):
            log.write(json.dumps({"tile": index, "nuclei": records}) + "\n")
            log.flush()
            progress.update()
        progress.close()
    paths = out / f"{stem}_nuclei.geojson", out / f"{stem}_nuclei.csv"
    records = (record for line in itertools.islice(read_jsonl(partial), 1, None) for record in line["nuclei"])
    count = write_nuclei(records, *paths, mpp=slide.mpp)
    partial.unlink()
    return {
        "nuclei": count, "region": list(bounds), "level": level, "tiles": len(tiles), "resumed_tiles": done,
        "files": [str(p) for p in paths], "pixels": area[2] * area[3],
    }


def _resume(partial: Path, header: dict) -> int:
    """How many tiles a previous run of the same job finished (0 without a matching partial file)."""
    if not partial.is_file():
        return 0
    lines = read_jsonl(partial)  # streamed: the file holds every nucleus found so far
    if next(lines, None) != json.loads(json.dumps(header)):
        return 0
    done = 0
    for line in lines:
        if line["tile"] != done:
            return 0
        done += 1
    logger.info("%s: resuming after %d finished tiles", partial.name, done)
    return done

"""The ways to make a prepared dataset: MoNuSeg, a generic folder, labelled images (MONAI Label), the synthetic demo.

Each writes ``DST/images/<name>.png`` ((H, W, 3) uint8 RGB), ``DST/labels/<name>.png``
((H, W) uint16 instance map, 0 = background), ``DST/datalist.json`` (see
:mod:`sppnet_monai.data.datalist`) and ``DST/prepare_summary.json``, and returns that summary.

A file that cannot be used is reported as a one-line warning naming it (logger
``sppnet_monai.data`` and the summary's ``warnings``) and the rest is still prepared;
:class:`~sppnet_monai.utils.SPPNetError` is raised only when the source folder is missing or
nothing usable remains. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sppnet_monai.data import instances as inst
from sppnet_monai.data.datalist import (
    IMAGES_DIR,
    LABELS_DIR,
    check_split_args,
    datalist_entry,
    split_train_val,
    write_datalist,
)
from sppnet_monai.data.image_io import read_rgb, write_json, write_png
from sppnet_monai.data.labels import POLYGON_SUFFIXES, label_instances, polygon_instances, read_polygon_label
from sppnet_monai.data.monuseg import MonusegLayout, RasterStats, find_layout, parse_annotation_xml, rasterise_regions
from sppnet_monai.data.synthetic import synthesize_sample, touching_pairs
from sppnet_monai.utils import SPPNetError

__all__ = ["SUMMARY_NAME", "labelled_sample", "prepare_demo", "prepare_folder", "prepare_labelled", "prepare_monuseg"]

logger = logging.getLogger("sppnet_monai.data")

SUMMARY_NAME = "prepare_summary.json"
FOLDER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_MAX_IDS_SHOWN = 8


class Report:
    """Collects the warnings of one preparation and logs each as it comes."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)


@dataclass
class Sample:
    """A loaded sample: ``image`` (H, W, 3) uint8, ``labels`` (H, W) uint16 instance map."""

    image: np.ndarray
    labels: np.ndarray
    instances: str  # how the labels were obtained, see sppnet_monai.data.instances
    source: str  # the file the labels come from, for messages
    details: dict = field(default_factory=dict)  # extra per-image summary fields


# Loads one sample, warning about what it can work around; raises SPPNetError when unusable.
Loader = Callable[[Report], Sample]


# --------------------------------------------------------------------------- shared steps


def _sample_from_mask(mask_path: Path, image: np.ndarray) -> Sample:
    """Labels from a mask file: binary -> connected components, else an instance map (the one mask rule,
    :func:`~sppnet_monai.data.labels.label_instances`)."""
    labels, how = label_instances(mask_path, image.shape[:2], str(mask_path))
    return Sample(image, labels, how, str(mask_path))


def _prepare_samples(loaders: dict[str, Loader], dst: Path, report: Report, desc: str) -> dict[str, dict]:
    """Load and write every sample; return ``{name: per-image summary}`` of those written."""
    written: dict[str, dict] = {}
    progress = tqdm(loaders.items(), desc=desc, unit="image", file=sys.stderr, dynamic_ncols=True, disable=not loaders)
    with logging_redirect_tqdm():  # warnings print above the progress bar, not inside it
        for name, load in progress:
            info = _prepare_one(name, load, dst, report)
            if info is not None:
                written[name] = info
    return written


def _prepare_one(name: str, load: Loader, dst: Path, report: Report) -> dict | None:
    """Load and write one sample; return its per-image summary, or None if it is unusable."""
    try:
        sample = load(report)
        num_instances = inst.count_instances(sample.labels)
        if num_instances == 0:
            raise SPPNetError(f"{sample.source}: no nucleus annotated")
    except SPPNetError as err:
        report.warn(f"{err}; skipping image {name}")
        return None
    write_png(dst / IMAGES_DIR / f"{name}.png", sample.image)
    write_png(dst / LABELS_DIR / f"{name}.png", sample.labels)
    return {"instances": sample.instances, "num_instances": num_instances, **sample.details}


def _finish(
    dataset: str,
    description: str,
    dst: Path,
    written: dict[str, dict],
    val_fraction: float,
    seed: int,
    report: Report,
    test_written: dict[str, dict] | None = None,
    **extra: object,
) -> dict:
    """Split, write the datalist and the summary, and return the summary."""
    train, val = split_train_val(list(written), val_fraction, seed)
    test = sorted(test_written) if test_written is not None else None
    images = {**written, **(test_written or {})}

    def entries(names: list[str]) -> list[dict]:
        return [datalist_entry(n, images[n]["instances"], images[n]["num_instances"]) for n in names]

    datalist = write_datalist(
        dst, dataset, description, entries(train), entries(val), None if test is None else entries(test)
    )
    splits = {"training": train, "validation": val, **({"test": test} if test is not None else {})}
    for split, names in splits.items():
        for name in names:
            images[name] = {"split": split, **images[name]}
    summary = {
        "dataset": dataset,
        **extra,
        "dst": str(dst),
        "datalist": str(datalist),
        "seed": seed,
        "val_fraction": val_fraction,
        "counts": {split: len(names) for split, names in splits.items()},
        "num_instances": sum(info["num_instances"] for info in images.values()),
        "images": {name: images[name] for name in sorted(images)},
        "warnings": report.warnings,
    }
    write_json(dst / SUMMARY_NAME, summary)
    logger.info("prepared %s in %s: %s", dataset, dst, summary["counts"])
    return summary


def _no_usable_image(src: Path, report: Report, when_empty: str) -> SPPNetError:
    if not report.warnings:
        return SPPNetError(f"{src}: {when_empty}")
    return SPPNetError(f"{src}: no usable image ({len(report.warnings)} problem(s) reported above)")


def _ids(region_ids: list[str]) -> str:
    shown = ", ".join(region_ids[:_MAX_IDS_SHOWN])
    return shown + (", ..." if len(region_ids) > _MAX_IDS_SHOWN else "")


# --------------------------------------------------------------------------- MoNuSeg


def _report_raster_stats(xml_path: Path, stats: RasterStats, shape: tuple[int, ...], report: Report) -> None:
    by_reason: dict[str, list[str]] = {}
    for region_id, reason in stats.degenerate:
        by_reason.setdefault(reason, []).append(region_id)
    for reason, ids in by_reason.items():
        report.warn(f"{xml_path}: skipped {len(ids)} degenerate region(s) {reason} (Id {_ids(ids)})")
    if stats.clipped:
        report.warn(
            f"{xml_path}: {len(stats.clipped)} region(s) have vertices outside the {shape[0]}x{shape[1]} image, "
            f"clipped to it (Id {_ids(stats.clipped)})"
        )
    if stats.overwritten:
        report.warn(
            f"{xml_path}: {len(stats.overwritten)} region(s) entirely covered by later regions, "
            f"dropped (Id {_ids(stats.overwritten)})"
        )


def _sample_from_xml(xml_path: Path, image: np.ndarray, report: Report) -> Sample:
    """Labels from the polygons of a MoNuSeg XML, one instance per Region."""
    annotation = parse_annotation_xml(xml_path)
    if not annotation.regions:
        raise SPPNetError(f"{xml_path}: annotation XML has no Region")
    labels, stats = rasterise_regions(annotation.regions, image.shape[:2])
    _report_raster_stats(xml_path, stats, image.shape, report)
    if not labels.any():
        raise SPPNetError(f"{xml_path}: no usable Region (all {stats.regions} degenerate)")
    details = {
        "regions": stats.regions,
        "degenerate_polygons": len(stats.degenerate),
        "overwritten_polygons": len(stats.overwritten),
        "clipped_polygons": len(stats.clipped),
        "microns_per_pixel": annotation.microns_per_pixel,
    }
    return Sample(image, labels, inst.FROM_XML, str(xml_path), details)


def _monuseg_loader(layout: MonusegLayout, image_path: Path) -> Loader:
    """XML polygons when there is a usable XML, else the binary mask."""

    def load(report: Report) -> Sample:
        xml_path, mask_path = layout.annotation_for(image_path), layout.mask_for(image_path)
        if xml_path is None and mask_path is None:
            raise SPPNetError(f"{image_path}: no matching annotation XML or binary mask")
        image = read_rgb(image_path)
        if xml_path is not None:
            try:
                return _sample_from_xml(xml_path, image, report)
            except SPPNetError as err:
                if mask_path is None:
                    raise
                report.warn(f"{err}; using {mask_path} instead")
        return _sample_from_mask(mask_path, image)

    return load


def prepare_monuseg(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    test_src: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Prepare MoNuSeg-2018 as distributed (training zip ``src``, optional test zip ``test_src``).

    Instances come from the XML polygons (see :mod:`sppnet_monai.data.monuseg` for the
    rasterisation rule); an image with no XML but a ``Binary_masks/<stem>.png`` gets instances
    from its connected components. The training images are split into training/validation
    by ``seed``; the test images, if any, form the datalist's ``test`` list.
    """
    check_split_args(val_fraction, seed)
    src, dst = Path(src), Path(dst)
    layout = find_layout(src)
    test_layout = find_layout(test_src) if test_src is not None else None
    report = Report()
    loaders = {p.stem: _monuseg_loader(layout, p) for p in layout.images}
    written = _prepare_samples(loaders, dst, report, desc="monuseg")
    if not written:
        raise _no_usable_image(src, report, "no .tif image in 'Tissue Images/', 'Tissue_Images/' or the folder itself")

    test_written = None
    if test_layout is not None:
        test_loaders = {}
        for path in test_layout.images:
            if path.stem in loaders:
                report.warn(f"{path}: an image named {path.stem} is already in {src}; skipping test image")
            else:
                test_loaders[path.stem] = _monuseg_loader(test_layout, path)
        test_written = _prepare_samples(test_loaders, dst, report, desc="monuseg test")
        if not test_written:
            report.warn(f"{test_src}: no usable test image")

    degenerate = sum(info.get("degenerate_polygons", 0) for info in {**written, **(test_written or {})}.values())
    return _finish(
        "MoNuSeg-2018",
        "MoNuSeg 2018 nuclei (H&E, 40x), prepared by sppnet_monai: labels are uint16 instance maps, 0 = background.",
        dst,
        written,
        val_fraction,
        seed,
        report,
        test_written,
        src=str(src),
        test_src=None if test_src is None else str(test_src),
        degenerate_polygons=degenerate,
    )


# --------------------------------------------------------------------------- generic folder


def _files_by_stem(folder: Path, report: Report) -> dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder``; duplicate stems keep the first by name."""
    by_stem: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES):
        if path.stem in by_stem:
            report.warn(f"{path}: same name as {by_stem[path.stem].name}; ignoring it")
        else:
            by_stem[path.stem] = path
    return by_stem


def _folder_loader(image_path: Path, mask_path: Path) -> Loader:
    def load(report: Report) -> Sample:
        return _sample_from_mask(mask_path, read_rgb(image_path))

    return load


def prepare_folder(src: str | os.PathLike, dst: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Prepare ``src/images/*`` + ``src/masks/*`` pairs matched by file stem (png, tif, jpg).

    A mask holding only 0/1 or 0/255 is binary and gets instances by connected components;
    any other mask is taken as an instance map (grey-level ids, or one colour per instance).
    """
    check_split_args(val_fraction, seed)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise SPPNetError(f"{src}: dataset folder does not exist")
    for sub in ("images", "masks"):
        if not (src / sub).is_dir():
            raise SPPNetError(f"{src}: expected an '{sub}' folder in it")
    report = Report()
    images, masks = _files_by_stem(src / "images", report), _files_by_stem(src / "masks", report)
    loaders: dict[str, Loader] = {}
    for stem, image_path in images.items():
        if stem in masks:
            loaders[stem] = _folder_loader(image_path, masks[stem])
        else:
            report.warn(f"{image_path}: no matching mask in {src / 'masks'}; skipping image {stem}")
    for stem in sorted(set(masks) - set(images)):
        report.warn(f"{masks[stem]}: no matching image in {src / 'images'}; ignoring it")
    written = _prepare_samples(loaders, dst, report, desc="folder")
    if not written:
        raise _no_usable_image(src, report, "no image in 'images/'")
    return _finish(
        src.name or "dataset",
        f"Nuclei instance segmentation prepared by sppnet_monai from {src.name}: "
        "labels are uint16 instance maps, 0 = background.",
        dst,
        written,
        val_fraction,
        seed,
        report,
        src=str(src),
    )


# --------------------------------------------------------------------------- labelled images (MONAI Label)

# Context kept around the outlines of a whole-slide label when its area is cut out of the slide.
SLIDE_LABEL_MARGIN = 32
# Largest area cut out of a slide for one whole-slide label: a label spread wider is refused (submit patches).
MAX_SLIDE_LABEL_SIDE = 8192


def labelled_sample(image_path: str | os.PathLike, label_path: str | os.PathLike, name: str) -> Sample:
    """The training sample of an image and its label file (:mod:`sppnet_monai.data.labels`).

    A plain image is taken whole. A whole-slide label (outlines in slide pixels, e.g. QuPath's *Submit
    Label* for the WSI) is cut out of the slide's level 0: the outlines' bounding box plus
    :data:`SLIDE_LABEL_MARGIN`, so that training does not read unlabelled tissue as background.
    ``name`` names the sample in messages (a datastore id, never a server path).

    Raises:
        SPPNetError: the image cannot be read, or :class:`~sppnet_monai.data.labels.LabelError`.
    """
    from sppnet_monai.data.slides import Slide

    image_path, label_path = Path(image_path), Path(label_path)
    try:
        slide = Slide(image_path)
    except SPPNetError as err:
        raise SPPNetError(f"{name}: the image cannot be read ({str(err).replace(str(image_path), 'image')})") from None
    with slide:
        if slide.is_slide and label_path.suffix.lower() not in POLYGON_SUFFIXES:
            raise SPPNetError(f"{name}: a slide's label must be outlines (ASAP XML or DSA JSON), or submit patches; got a mask")
        if not slide.is_slide:
            image = np.ascontiguousarray(slide.read(0, 0, *slide.size()).transpose(1, 2, 0))
            labels, how = label_instances(label_path, image.shape[:2], name)
            return Sample(image, labels, how, name)
        outlines = read_polygon_label(label_path, name)
        width, height = slide.size()
        x0, y0, w, h = outlines.box(SLIDE_LABEL_MARGIN, (width, height))
        if w <= 0 or h <= 0:
            raise SPPNetError(f"{name}: the outlines (box {outlines.box()}) lie outside the {width}x{height} slide")
        if max(w, h) > MAX_SLIDE_LABEL_SIDE:
            raise SPPNetError(f"{name}: the outlines spread over {w}x{h} slide pixels, more than {MAX_SLIDE_LABEL_SIDE}; submit them as patches")
        image = slide.read(x0, y0, w, h).transpose(1, 2, 0)
    labels = polygon_instances(outlines.shifted(y0, x0), image.shape[:2], name)
    return Sample(np.ascontiguousarray(image), labels, inst.FROM_XML, name, {"slide_region": [x0, y0, w, h]})


def prepare_labelled(
    pairs: dict[str, tuple[str, str]], dst: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, dataset: str = "labelled"
) -> dict:
    """Prepare ``{name: (image path, label path)}`` pairs, e.g. a MONAI Label datastore's final labels.

    Labels may be ASAP XML (QuPath), DSA JSON or masks (:func:`labelled_sample`); an unusable pair is a
    warning naming it, as in the other preparations.
    """
    check_split_args(val_fraction, seed)
    dst = Path(dst)
    report = Report()

    def loader(name: str, image: str, label: str) -> Loader:
        return lambda report: labelled_sample(image, label, name)

    loaders = {name: loader(name, *pairs[name]) for name in sorted(pairs)}
    written = _prepare_samples(loaders, dst, report, desc="labelled")
    if not written:  # the reasons, not the destination folder: a server answers with this message
        raise SPPNetError(f"no usable label ({'; '.join(report.warnings) or 'none given'})")
    return _finish(
        dataset, "Images with a final label, prepared by sppnet_monai: labels are uint16 instance maps, 0 = background.",
        dst, written, val_fraction, seed, report,
    )


# --------------------------------------------------------------------------- synthetic demo


def _demo_loader(seed: int, index: int, image_size: int) -> Loader:
    def load(report: Report) -> Sample:
        sample = synthesize_sample(np.random.default_rng([seed, index]), image_size)
        details = {"touching_pairs": len(touching_pairs(sample.labels)), "overlapping_pairs": sample.overlapping}
        return Sample(sample.image, sample.labels, inst.FROM_SYNTHESIS, f"synthetic image {index}", details)

    return load


def prepare_demo(
    dst: str | os.PathLike, num_images: int = 12, image_size: int = 256, seed: int = 0, val_fraction: float = 0.2
) -> dict:
    """Generate the deterministic synthetic H&E-like dataset (see :mod:`sppnet_monai.data.synthetic`).

    The same arguments give byte-identical files.
    """
    check_split_args(val_fraction, seed)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise SPPNetError(f"num_images must be a positive integer, got {num_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise SPPNetError(f"image_size must be an integer >= 32, got {image_size!r}")
    dst = Path(dst)
    report = Report()
    loaders = {f"demo_{i:03d}": _demo_loader(seed, i, image_size) for i in range(num_images)}
    written = _prepare_samples(loaders, dst, report, desc="demo")
    if not written:
        raise SPPNetError(f"{dst}: the synthetic generator made no image with nuclei")
    return _finish(
        "sppnet-demo",
        f"Synthetic H&E-like nuclei ({num_images} images of {image_size}x{image_size}, seed {seed}) "
        "made by sppnet_monai: labels are uint16 instance maps, 0 = background.",
        dst,
        written,
        val_fraction,
        seed,
        report,
        image_size=image_size,
    )

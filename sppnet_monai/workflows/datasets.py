"""Which dataset a bundle run uses, checked before any training starts."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

from monai.data import load_decathlon_datalist
from PIL import Image

from sppnet_monai.clicks import click_pixels
from sppnet_monai.data.datalist import DATALIST_NAME
from sppnet_monai.utils import SPPNetError

logger = logging.getLogger(__name__)


def dataset_folder(dataset_dir: str | None, demo_dir: str) -> str:
    """Folder holding ``datalist.json``: ``dataset_dir`` when given, else the synthetic demo in ``demo_dir``.

    Only checks: nothing is written. The bundle's ``initialize`` generates the demo beforehand
    (:func:`ensure_demo_dataset`), so a config id that resolves to this function has no side effect.
    """
    if dataset_dir:
        if not (Path(dataset_dir) / DATALIST_NAME).is_file():
            raise SPPNetError(
                f"no {DATALIST_NAME} in dataset_dir {dataset_dir}: prepare it with `python -m sppnet_monai prepare`."
            )
        return str(dataset_dir)
    if not (Path(demo_dir) / DATALIST_NAME).is_file():
        raise SPPNetError(
            f"no dataset_dir given and no {DATALIST_NAME} in demo_dir {demo_dir}: run the bundle's initialize "
            "(it generates the demo) or `python -m sppnet_monai prepare demo`, or give --dataset_dir."
        )
    return str(demo_dir)


def ensure_demo_dataset(
    dataset_dir: str | None, demo_dir: str, demo_num_images: int, demo_image_size: int, seed: int = 0
) -> bool:
    """Generate the synthetic demo into ``demo_dir`` when no ``dataset_dir`` is given and it is not there yet.

    Returns whether it generated anything. A step of the bundle's ``initialize`` (a few seconds, once;
    later runs reuse the demo). Not safe to run from several processes at once on the same ``demo_dir``:
    ``multi_gpu_train.json`` calls it on rank 0 only, after the process group exists, and the other
    ranks wait at a barrier before anything reads the dataset.
    """
    if dataset_dir or (Path(demo_dir) / DATALIST_NAME).is_file():
        return False
    from sppnet_monai.data.prepare import prepare_demo

    logger.info("no dataset_dir given: generating the synthetic demo dataset in %s", demo_dir)
    prepare_demo(demo_dir, num_images=demo_num_images, image_size=demo_image_size, seed=seed)
    return True


def datalist_split(dataset_dir: str, split: str) -> list[dict]:
    """Entries of one split (``training``, ``validation``, ``test``) with absolute paths, every file checked."""
    datalist_file = os.path.join(dataset_dir, DATALIST_NAME)
    try:
        with open(datalist_file) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SPPNetError(f"datalist {datalist_file} cannot be read: {err}") from err
    if not isinstance(content, dict) or not content.get(split):
        raise SPPNetError(f"datalist {datalist_file} has no {split!r} entries.")
    try:
        entries = load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key=split, base_dir=dataset_dir)
    except (KeyError, TypeError, ValueError) as err:
        raise SPPNetError(f"datalist {datalist_file} is malformed in {split!r}: {err}") from err
    for entry in entries:
        for key in ("image", "label"):
            if key not in entry:
                raise SPPNetError(f"datalist {datalist_file}: a {split!r} entry has no {key!r}: {entry}")
            if not os.path.isfile(entry[key]):
                raise SPPNetError(f"datalist {datalist_file}: {split!r} {key} {entry[key]} does not exist.")
        image_size, label_size = image_file_size(entry["image"]), image_file_size(entry["label"])
        if image_size != label_size:
            raise SPPNetError(
                f"datalist {datalist_file}: label {entry['label']} is {label_size[0]}x{label_size[1]} "
                f"but image {entry['image']} is {image_size[0]}x{image_size[1]} (width x height)."
            )
    logger.info("%s: %d images from %s", split, len(entries), datalist_file)
    return entries


def read_clicks_file(path: str | os.PathLike) -> dict[str, dict[str, list[list[float]]]]:
    """Clicks per image file name, from JSON or CSV.

    JSON: ``{"a.png": {"foreground": [[x, y]], "background": [[x, y]]}}``.
    CSV: a header ``image,x,y,label`` and one row per click, label 1 (foreground) or 0 (background).
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            clicks: dict = {}
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    kind = {"1": "foreground", "0": "background"}[row["label"].strip()]
                    entry = clicks.setdefault(row["image"].strip(), {"foreground": [], "background": []})
                    entry[kind].append([float(row["x"]), float(row["y"])])
            return clicks
        with open(path) as f:
            clicks = json.load(f)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, AttributeError) as err:
        raise SPPNetError(f"clicks file {path} cannot be read ({type(err).__name__}: {err}); expected JSON "
                          '{"image.png": {"foreground": [[x, y]], "background": [[x, y]]}} or CSV image,x,y,label') from err
    if not isinstance(clicks, dict) or not all(isinstance(v, dict) for v in clicks.values()):
        raise SPPNetError(f"clicks file {path} must map image file names to {{'foreground': [...], 'background': [...]}}.")
    return clicks


def image_datalist(input_dir: str, pattern: str = "*.png", clicks_file: str | None = None) -> list[dict]:
    """Inference entries ``{"image", "foreground", "background"}`` for the images matching ``pattern``.

    ``clicks_file`` (optional, see :func:`read_clicks_file`) gives clicks per image file name;
    images without clicks get them chosen automatically (:class:`~sppnet_monai.transforms.AutoClickd`).
    """
    images = sorted(str(p) for p in Path(input_dir).glob(pattern) if p.is_file())
    if not images:
        raise SPPNetError(f"no images matching {pattern!r} in {input_dir}.")
    clicks = read_clicks_file(clicks_file) if clicks_file else {}
    return [image_entry(image, clicks) for image in images]


def image_file_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (the bundle reads images with Pillow)."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as err:
        raise SPPNetError(f"{path} cannot be read as an image: {err}") from err


def image_entry(image: str, clicks: dict) -> dict:
    """The inference entry of ``image`` with its clicks from a :func:`read_clicks_file` mapping.

    Raises :class:`SPPNetError` naming the image and click when a given click lies outside the image.
    """
    given = clicks.get(Path(image).name, {})
    if given:
        width, height = image_file_size(image)
        for kind in ("foreground", "background"):
            click_pixels(given.get(kind, []), width, height, kind, str(image))
    return {"image": image, "foreground": given.get("foreground", []), "background": given.get("background", [])}

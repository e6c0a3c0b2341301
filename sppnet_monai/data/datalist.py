"""The train/validation split and MONAI's datalist (Decathlon) JSON.

``DST/datalist.json`` loads with::

    monai.data.load_decathlon_datalist(DST / "datalist.json", data_list_key="training", base_dir=DST)

Every entry has the same keys, all strings or ints, so that MONAI's default collate can batch
them: ``image``, ``label`` (paths relative to DST), ``name`` (file stem), ``instances`` (how the
label map was made: ``xml``, ``connected_components``, ``instance_map`` or ``synthetic``) and
``num_instances``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sppnet_monai.data.image_io import write_json
from sppnet_monai.utils import SPPNetError

__all__ = [
    "DATALIST_NAME",
    "IMAGES_DIR",
    "LABELS_DIR",
    "check_split_args",
    "datalist_entry",
    "split_train_val",
    "write_datalist",
]

DATALIST_NAME = "datalist.json"
IMAGES_DIR = "images"
LABELS_DIR = "labels"


def datalist_entry(name: str, instances: str, num_instances: int) -> dict:
    """The datalist record of the sample written as ``images/<name>.png`` + ``labels/<name>.png``."""
    return {
        "image": f"{IMAGES_DIR}/{name}.png",
        "label": f"{LABELS_DIR}/{name}.png",
        "name": name,
        "instances": instances,
        "num_instances": int(num_instances),
    }


def check_split_args(val_fraction: float, seed: int) -> None:
    """Raise SPPNetError unless ``0 <= val_fraction < 1`` and ``seed`` is a non-negative int."""
    if not 0.0 <= val_fraction < 1.0:
        raise SPPNetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SPPNetError(f"seed must be a non-negative integer, got {seed!r}")


def split_train_val(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``names`` into sorted (training, validation) name lists, deterministic in ``seed``.

    The validation set has ``round(len(names) * val_fraction)`` names, at least 1 when
    ``val_fraction > 0`` and there are 2 or more names, and always leaves 1 for training.
    The split depends on the set of names only, not on their order.
    """
    check_split_args(val_fraction, seed)
    ordered = sorted(names)
    num_val = int(round(len(ordered) * val_fraction))
    if val_fraction > 0 and len(ordered) >= 2:
        num_val = min(max(num_val, 1), len(ordered) - 1)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    val_names = {ordered[i] for i in permutation[:num_val]}
    return [n for n in ordered if n not in val_names], [n for n in ordered if n in val_names]


def write_datalist(
    dst: str | os.PathLike,
    name: str,
    description: str,
    training: list[dict],
    validation: list[dict],
    test: list[dict] | None = None,
) -> Path:
    """Write ``dst/datalist.json`` (atomically) and return its path; ``test`` key only if given."""
    datalist: dict = {
        "name": name,
        "description": description,
        "tensorImageSize": "2D",
        "labels": {"0": "background", "1": "nucleus"},
        "numTraining": len(training),
        "numValidation": len(validation),
        "training": training,
        "validation": validation,
    }
    if test is not None:
        datalist["numTest"] = len(test)
        datalist["test"] = test
    path = Path(dst) / DATALIST_NAME
    write_json(path, datalist)
    return path

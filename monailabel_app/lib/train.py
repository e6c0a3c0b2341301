"""MONAI Label train task: the bundle's own ``train.json`` on the datastore's finished labels."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.engine import TRAINED_CHECKPOINT, served_checkpoint

logger = logging.getLogger(__name__)

VAL_FRACTION, SPLIT_SEED = 0.2, 0  # prepare's defaults

# Request keys passed to the bundle as config overrides, with their types.
OVERRIDES = {
    "max_epochs": int,
    "image_size": int,
    "batch_size": int,
    "val_interval": int,
    "crops_per_image": int,
    "learning_rate": float,
    "early_stop_patience": int,
}


class TrainRequestError(ValueError):
    """A /train parameter the task cannot use; the message names it and says why."""


class TrainingFailed(RuntimeError):
    """The training process failed; the message ends with its last output line."""


def train_overrides(request: Mapping[str, Any]) -> Dict[str, Any]:
    """The bundle overrides the request sets (its :data:`OVERRIDES` keys), checked and typed.

    Each must be a positive integer (``2``, ``2.0`` or ``"2"``; a positive finite number for
    ``learning_rate``) and ``image_size`` one the network takes. The server checks a request with
    this before it starts the training (so that a bad value is a 400, not a failed background task);
    the task converts the values with it.

    Raises:
        TrainRequestError: naming the first bad value.
    """
    from sppnet_monai.networks import check_image_size

    overrides = {key: _positive(key, request[key], kind) for key, kind in OVERRIDES.items() if request.get(key) not in (None, "")}
    if "image_size" in overrides:
        try:
            check_image_size(overrides["image_size"])
        except ValueError as err:
            raise TrainRequestError(str(err)) from None
    return overrides


def _positive(key: str, value: Any, kind: type) -> int | float:
    """``value`` as a positive ``kind`` (int: whole numbers only); TrainRequestError otherwise."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # bool is an int to Python, not to a user
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0 or (kind is int and not number.is_integer()):
        raise TrainRequestError(f"{key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return int(value) if kind is int and isinstance(value, int) else kind(number)


def validate_by_last_epoch(overrides: Dict[str, Any], configured: Mapping[str, Any]) -> str | None:
    """Lower ``val_interval`` to ``max_epochs`` in ``overrides`` when it is larger, and say so; else None.

    The bundle validates, and writes its best model, every ``val_interval`` epochs only: a run
    shorter than that would end without a model. ``configured``: the configs' values, for the keys
    the request does not set.
    """
    epochs, interval = (overrides.get(key, configured.get(key)) for key in ("max_epochs", "val_interval"))
    if not (isinstance(epochs, int) and isinstance(interval, int)) or interval <= epochs:
        return None
    overrides["val_interval"] = epochs
    return f"val_interval {interval} is more than max_epochs {epochs}: validating at epoch {epochs}, so that the run writes a model"


def train_in_subprocess(request: Mapping[str, Any]) -> Dict[str, Any]:
    """Run the training of ``request`` in a child process and return its result.

    The child is MONAI Label's own command for background training
    (``python -m monailabel.interfaces.utils.app -m train``; the server's ``MONAI_LABEL_*``
    environment names the app and studies), so the calling server stays responsive and does not keep
    the training's memory. Its output goes to this process's log.

    Raises:
        TrainingFailed: the child exited with an error.
    """
    # As MONAI Label's background tasks: the child's datastore watches no files.
    env = {**os.environ, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "monailabel.interfaces.utils.app", "-m", "train", "-r", json.dumps(dict(request)), "-o", str(output)]
        last = ""
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as child:
            for line in child.stdout:
                if line.strip():
                    last = line.strip()
                    logger.info("train process: %s", last)
        if child.returncode or not output.is_file():
            raise TrainingFailed(f"the training process exited with code {child.returncode} (its output is in the server log): {last}")
        return json.loads(output.read_text())


class SPPNetTrain(TrainTask):
    """Train the served bundle (``bundle_root``) on the images of the datastore that have a final label.

    The datastore's ``(image, labels/final/<id>.png)`` pairs are written as a datalist
    (``<bundle>/data/monailabel/datalist.json``, 20% of the images, at least one, for validation)
    and ``configs/train.json`` (plus ``train_configs``, e.g. ``fast_cpu.json``) runs with
    ``dataset_dir`` set to it, through :class:`monai.bundle.ConfigWorkflow`. A label may be a binary
    mask (nuclei are then its connected components) or an instance map.

    Each run writes its checkpoints in a fresh ``models/monailabel_runs/<time>/`` (so the bundle's
    resumable state of another dataset does not stop it) and, with ``finetune`` (default), starts from
    the served model (``models/model.pt``, else the shipped ``weights/sppnet_monuseg.pt``). The run's best model then replaces
    ``models/model.pt`` atomically; the infer task reloads it at its next request.
    """

    def __init__(self, bundle_dir: str, train_configs: list[str], defaults: Dict[str, Any]):
        super().__init__("Train SPPNet with the bundle's train.json on the datastore's labels")
        self.bundle_dir = Path(bundle_dir)
        self.train_configs = train_configs
        self.defaults = defaults

    def config(self):
        return dict(self.defaults)

    def configured(self) -> Dict[str, Any]:
        """The :data:`OVERRIDES` keys' values in ``train.json`` + ``train_configs`` (later files win)."""
        from monai.bundle import ConfigParser

        config = ConfigParser.load_config_files(self.config_files())
        return {key: config[key] for key in OVERRIDES if key in config}

    def config_files(self) -> list[str]:
        """The training configs, in the order they override each other."""
        configs = self.bundle_dir / "configs"
        return [str(configs / "train.json")] + [str(configs / name) for name in self.train_configs]

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        from monai.bundle import ConfigWorkflow

        from sppnet_monai.data.datalist import split_train_val, write_datalist
        from sppnet_monai.utils import atomic_path

        overrides = train_overrides(request)
        note = validate_by_last_epoch(overrides, self.configured())
        if note:
            logger.warning(note)
        pairs = {d["image"]: d["label"] for d in datastore.datalist()}
        if len(pairs) < 2:
            raise ValueError(f"training needs at least 2 images with a final label in the datastore, found {len(pairs)}.")
        # The split rule of `prepare` (one home): deterministic in the seed, independent of the order.
        training, validation = split_train_val(list(pairs), VAL_FRACTION, SPLIT_SEED)
        dataset_dir = self.bundle_dir / "data" / "monailabel"
        dataset_dir.mkdir(parents=True, exist_ok=True)
        training, validation = ([{"image": image, "label": pairs[image]} for image in split] for split in (training, validation))
        write_datalist(dataset_dir, "monailabel", "MONAI Label datastore images with a final label", training, validation)
        num_val = len(validation)

        models = self.bundle_dir / "models"
        run_dir = models / "monailabel_runs" / time.strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        served = self.bundle_dir / TRAINED_CHECKPOINT
        finetune = str(request.get("finetune", True)).lower() not in ("false", "0", "no")
        current = served_checkpoint(self.bundle_dir)
        if finetune and current.is_file():
            from sppnet_monai.networks import RECIPE_DEFAULTS
            from sppnet_monai.networks.checkpoints import read_recipe

            start = run_dir / "initial_model.pt"
            shutil.copy2(current, start)
            # Fine-tuning keeps the served model's settings; a contradicting request fails on loading.
            for key in ("image_size", *RECIPE_DEFAULTS):
                overrides.setdefault(key, read_recipe(start).get(key, RECIPE_DEFAULTS.get(key)))
            overrides = {k: v for k, v in overrides.items() if v is not None}
            overrides["network"] = f"$sppnet_monai.workflows.load_trained(@network_def, {str(start)!r}).to(@device)"
        overrides["ckpt_dir"] = str(run_dir)
        configs = self.bundle_dir / "configs"
        config_files = self.config_files()
        logger.info("training %s on %d images (%d validation); overrides %s", config_files, len(pairs), num_val, overrides)
        workflow = ConfigWorkflow(
            config_file=config_files,
            meta_file=str(configs / "metadata.json"),
            logging_file=str(configs / "logging.conf"),
            workflow_type="train",
            bundle_root=str(self.bundle_dir),
            dataset_dir=str(dataset_dir),
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        best = run_dir / "model.pt"
        if not best.is_file():
            raise RuntimeError(f"training wrote no {best}")
        with atomic_path(served) as tmp:
            shutil.copy2(best, tmp)
        logger.info("new model %s -> %s", best, served)
        return {"model": str(served), "run_dir": str(run_dir), "finetuned": "network" in overrides, "images": len(pairs), "validation": num_val, "notes": [note] if note else []}

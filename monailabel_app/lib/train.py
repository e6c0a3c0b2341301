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

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
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


# The held-back comparison of a new model with the served one: the protocol and the score that decide.
GATE_PROTOCOL, GATE_SCORE = "automatic", "dice"
RUN_REQUEST, RUN_RESULT = "request.json", "result.json"


def unfinished_run(runs: Path, request: Mapping[str, Any]) -> Path | None:
    """The latest run folder under ``runs`` started for the same ``request`` and never finished, if any:
    a training stopped (``DELETE /train``, a server restart) resumes there (:class:`ResumableTrainingState`)."""
    for run_dir in sorted((d for d in runs.glob("*") if d.is_dir()), reverse=True):
        if (run_dir / RUN_RESULT).is_file():
            return None  # the latest run finished: start afresh
        try:
            if json.loads((run_dir / RUN_REQUEST).read_text()) == request:
                return run_dir
        except (OSError, json.JSONDecodeError):
            continue
    return None


def held_back_gate(new: Mapping[str, float], served: Mapping[str, float]) -> tuple[bool, str]:
    """Serve the new model only if it scores at least as well as the served one on the held-back labels."""
    better = new[GATE_SCORE] >= served[GATE_SCORE]
    verdict = "serving the new model" if better else "keeping the served model"
    return better, (
        f"{verdict}: held-back {GATE_SCORE} {new[GATE_SCORE]:.4f} (new) against {served[GATE_SCORE]:.4f} (served), "
        f"AJI {new['aji']:.4f} against {served['aji']:.4f}"
    )


class SPPNetTrain(TrainTask):
    """Train the served bundle (``bundle_root``) on the images of the datastore that have a final label.

    The datastore's final labels (QuPath's ASAP XML of a patch or of a whole slide, DSA JSON, PNG masks)
    become a prepared dataset in ``<bundle>/data/monailabel/`` through the project's one label rule
    (:func:`sppnet_monai.data.prepare.prepare_labelled`; 20% of the images, at least one, held back for
    validation), and ``configs/train.json`` (plus ``train_configs``, e.g. ``fast_cpu.json``) runs on it
    through :class:`monai.bundle.ConfigWorkflow`, in bf16 on a CPU with bf16 units as every training.

    Each run writes its checkpoints in ``models/monailabel_runs/<time>/``; a run that did not finish
    (``DELETE /train``, a server restart) resumes from its last epoch when ``/train`` is asked again with the
    same parameters and labels. With ``finetune`` (default) it starts from the served model
    (``models/model.pt``, else the shipped ``weights/sppnet_monuseg.pt``). At the end the run's best model
    and the served one are scored on the held-back images (:data:`GATE_PROTOCOL` protocol); the new one
    replaces ``models/model.pt`` atomically only if its :data:`GATE_SCORE` is at least the served model's,
    and the result says which and why. The infer task reloads the model at its next request.
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

    def prepare(self, datastore: Datastore) -> tuple[Path, dict]:
        """The datastore's final labels as a prepared dataset: ``(dataset_dir, prepare summary)``."""
        from sppnet_monai.data.prepare import prepare_labelled

        final = DefaultLabelTag.FINAL.value
        pairs = {
            image: (datastore.get_image_uri(image), datastore.get_label_uri(datastore.get_labels_by_image_id(image)[final], final))
            for image in datastore.get_labeled_images(final)
        }
        dataset_dir = self.bundle_dir / "data" / "monailabel"
        if dataset_dir.exists():
            shutil.rmtree(dataset_dir)  # labels may have been replaced or removed since the last run
        # The split rule of `prepare` (one home): deterministic in the seed, independent of the order.
        summary = prepare_labelled(pairs, dataset_dir, VAL_FRACTION, SPLIT_SEED, dataset="monailabel") if pairs else None
        usable = summary["counts"]["training"] + summary["counts"]["validation"] if summary else 0
        if usable < 2:
            problems = f" ({'; '.join(summary['warnings'])})" if summary and summary["warnings"] else ""
            raise ValueError(f"training needs at least 2 images with a usable final label in the datastore, found {usable}{problems}.")
        # What a stopped run must have trained on to be resumed: the same labels, unchanged since.
        summary["label_stamps"] = {image: [os.stat(label).st_size, os.stat(label).st_mtime_ns] for image, (_, label) in sorted(pairs.items())}
        return dataset_dir, summary

    def score(self, checkpoint: Path, dataset_dir: Path, out: Path) -> Dict[str, float]:
        """Mean scores of ``checkpoint`` on the held-back (validation) images of ``dataset_dir``."""
        from sppnet_monai.evaluate import run_evaluate

        result = run_evaluate(
            str(dataset_dir), str(out), checkpoint=str(checkpoint), split="validation", protocol=GATE_PROTOCOL,
            config=str(self.bundle_dir / "configs" / "inference.json"),
        )
        return {key: float(value["mean"]) for key, value in result.items() if isinstance(value, dict) and "mean" in value}

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        from monai.bundle import ConfigWorkflow

        from sppnet_monai.utils import atomic_path

        overrides = train_overrides(request)
        note = validate_by_last_epoch(overrides, self.configured())
        notes = [note] if note else []
        if note:
            logger.warning(note)
        dataset_dir, summary = self.prepare(datastore)
        notes += summary["warnings"]
        counts = summary["counts"]

        models = self.bundle_dir / "models"
        runs = models / "monailabel_runs"
        finetune = str(request.get("finetune", True)).lower() not in ("false", "0", "no")
        run_request = {"overrides": overrides, "finetune": finetune, "labels": summary["label_stamps"]}
        run_dir = unfinished_run(runs, run_request) if runs.is_dir() else None
        resumed = run_dir is not None
        if resumed:
            logger.info("resuming the unfinished run %s", run_dir)
        else:
            run_dir = runs / time.strftime("%Y%m%d-%H%M%S")
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_REQUEST).write_text(json.dumps(run_request))
        served = self.bundle_dir / TRAINED_CHECKPOINT
        start = run_dir / "initial_model.pt"
        if not start.is_file() and served_checkpoint(self.bundle_dir).is_file():
            shutil.copy2(served_checkpoint(self.bundle_dir), start)  # what is served now: the gate's reference
        finetune = finetune and start.is_file()
        if finetune:
            from sppnet_monai.networks import RECIPE_DEFAULTS
            from sppnet_monai.networks.checkpoints import read_recipe

            # Fine-tuning keeps the served model's settings; a contradicting request fails on loading.
            recipe = read_recipe(start)
            for key in ("image_size", *RECIPE_DEFAULTS):
                overrides.setdefault(key, recipe.get(key, RECIPE_DEFAULTS.get(key)))
            overrides = {k: v for k, v in overrides.items() if v is not None}
            overrides["network"] = f"$sppnet_monai.workflows.load_trained(@network_def, {str(start)!r}).to(@device)"
        overrides["ckpt_dir"] = str(run_dir)
        configs = self.bundle_dir / "configs"
        config_files = self.config_files()
        logger.info("training %s on %s images; overrides %s", config_files, counts, overrides)
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
            raise RuntimeError(f"training wrote no model in its run folder {run_dir.name}")
        new_scores = self.score(best, dataset_dir, run_dir / "held_back_new")
        if start.is_file():
            served_scores = self.score(start, dataset_dir, run_dir / "held_back_served")
            serve_new, why = held_back_gate(new_scores, served_scores)
        else:
            served_scores, serve_new = None, True
            why = f"serving the new model: no model was served; held-back {GATE_SCORE} {new_scores[GATE_SCORE]:.4f}"
        logger.info(why)
        if serve_new:
            with atomic_path(served) as tmp:
                shutil.copy2(best, tmp)
        result = {
            "model": str(served.relative_to(self.bundle_dir)), "served_new_model": serve_new, "why": why,
            "held_back": {"new": new_scores, "served": served_scores}, "run_dir": run_dir.name, "resumed": resumed,
            "finetuned": finetune, "images": counts["training"] + counts["validation"], "validation": counts["validation"],
            "notes": notes,
        }
        (run_dir / RUN_RESULT).write_text(json.dumps(result))
        return result

"""MONAI Label train task: the bundle's own ``train.json`` on the datastore's finished labels."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict

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

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        from monai.bundle import ConfigWorkflow

        from sppnet_monai.data.datalist import split_train_val, write_datalist
        from sppnet_monai.utils import atomic_path

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

        overrides = {k: OVERRIDES[k](request[k]) for k in OVERRIDES if request.get(k) not in (None, "")}
        models = self.bundle_dir / "models"
        run_dir = models / "monailabel_runs" / time.strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        served = self.bundle_dir / TRAINED_CHECKPOINT
        finetune = str(request.get("finetune", True)).lower() not in ("false", "0", "no")
        current = served_checkpoint(self.bundle_dir)
        if finetune and current.is_file():
            from sppnet_monai.networks.checkpoints import read_recipe

            start = run_dir / "initial_model.pt"
            shutil.copy2(current, start)
            # Fine-tuning keeps the served model's settings; a contradicting request fails on loading.
            for key in ("image_size", "fusion", "instance_head"):
                overrides.setdefault(key, read_recipe(start).get(key))
            overrides = {k: v for k, v in overrides.items() if v is not None}
            overrides["network"] = f"$sppnet_monai.workflows.load_trained(@network_def, {str(start)!r}).to(@device)"
        overrides["ckpt_dir"] = str(run_dir)
        configs = self.bundle_dir / "configs"
        config_files = [str(configs / "train.json")] + [str(configs / name) for name in self.train_configs]
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
        return {"model": str(served), "run_dir": str(run_dir), "finetuned": "network" in overrides, "images": len(pairs), "validation": num_val}

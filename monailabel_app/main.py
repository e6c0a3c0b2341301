"""MONAI Label app serving the SPPNet bundle: one click on a nucleus, all nuclei of its neighbourhood back.

Start it (the ``monailabel`` pip package, offline: nothing is downloaded)::

    monailabel start_server --app monailabel_app --studies IMAGES_FOLDER \
        --conf bundle bundle --host 127.0.0.1 --port 8000

``--conf`` keys (all optional):

- ``bundle``: the bundle folder (``configs/inference.json`` + ``models/model.pt``); default: the
  repository's ``bundle/`` next to this app.
- ``threshold``: override of ``inference.json``. The network's ``image_size`` (and ``fusion``) come
  from the recipe ``models/model.pt`` records.
- ``cache_size``: window embeddings kept in memory (default 8).
- ``train_configs``: comma-separated extra configs for ``/train`` after ``train.json``
  (default ``fast_cpu.json``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib import routes
from lib.activelearning import NextPatch
from lib.engine import ClickSegmenter
from lib.infer import CANCEL_COUNT, NO_SLIDE, SPPNetClickInfer, check_wsi_request
from lib.train import SPPNetTrain, train_in_subprocess
from sppnet_monai.utils import SPPNetError, without_folders

logger = logging.getLogger(__name__)

MODEL_NAME = "sppnet"
CLICK_MODEL_NAME = "sppnet_click"


class SPPNetApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        default_bundle = Path(app_dir).resolve().parent / "bundle"
        self.bundle_dir = Path(conf.get("bundle") or default_bundle).expanduser().resolve()
        overrides = {}
        if conf.get("threshold"):
            overrides["threshold"] = float(conf["threshold"])
        self.segmenter = ClickSegmenter(self.bundle_dir, cache_size=int(conf.get("cache_size", 8)), **overrides)
        self.train_configs = [c for c in str(conf.get("train_configs", "fast_cpu.json")).split(",") if c]
        self.train_defaults = {"max_epochs": 10}
        if not (self.bundle_dir / "configs" / "inference.json").is_file():
            raise FileNotFoundError(f"no bundle at {self.bundle_dir} (configs/inference.json); pass --conf bundle PATH")
        if not self.segmenter.checkpoint.is_file():
            logger.warning("no model at %s yet: /infer answers 400 until it exists (train via /train)", self.segmenter.checkpoint)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SPPNet",
            description="Single-point prompt nuclei segmentation (SPPNet bundle)",
            version="1.0",
            labels={"nuclei": 1},
        )

    def init_infers(self) -> Dict[str, InferTask]:
        # One model, two entries for the QuPath extension: its rectangle command (any number of
        # "Positive"/"Negative" points, zero included) and its click tool (a "nuclick" model).
        return {
            MODEL_NAME: SPPNetClickInfer(self.segmenter),
            CLICK_MODEL_NAME: SPPNetClickInfer(self.segmenter, "SPPNet: every point is a click on a nucleus", nuclick=True),
        }

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {MODEL_NAME: SPPNetTrain(str(self.bundle_dir), self.train_configs, self.train_defaults)}

    def init_strategies(self) -> Dict[str, Strategy]:
        # QuPath's Next Sample lists these (GET /info/) and draws the answer's bbox as the patch to label.
        return {"random": NextPatch(self.segmenter, uncertainty=False), "entropy": NextPatch(self.segmenter, uncertainty=True)}

    def check_label(self, image: str, label_file: str) -> dict:
        """What a final label of ``image`` trains: ``{"nuclei": N}``; 404 for an unknown image, 400 with the reason
        for a label that cannot train (no outline, malformed file, outlines outside the patch, wrong size)."""
        from sppnet_monai.data.prepare import labelled_sample

        path = self._image_path(image)
        try:
            sample = labelled_sample(path, label_file, image)
        except SPPNetError as err:
            raise HTTPException(status_code=400, detail=without_folders(without_folders(str(err), label_file), path)) from None
        return {"nuclei": int(sample.labels.max())}

    def _image_path(self, image: str, datastore=None) -> str:
        """The file of ``image`` (a path, or a datastore id); 404 naming the id otherwise.
        (MONAI Label maps an unknown id to "" and lets the task fail.)"""
        path = image if os.path.exists(image) else (datastore or self.datastore()).get_image_uri(image)
        if not path or not os.path.exists(path):
            raise HTTPException(status_code=404, detail=f"unknown image id {image!r}: GET /datastore/?output=all lists the ids.")
        return path

    def _check_model(self, model) -> None:
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")

    def infer(self, request, datastore=None):
        if isinstance(request.get("image"), str):
            self._image_path(request["image"], datastore)
        if request.get("model"):
            self._check_model(request["model"])
        return super().infer(request, datastore)

    def infer_wsi(self, request, datastore=None):
        """MONAI Label's WSI protocol (QuPath ``output=asap``, DSA ``output=dsa``), its request checked first.

        MONAI Label splits the region into tiles and calls the infer task per tile; here the request is
        validated once (4xx with the reason), CPU-only machines are served (MONAI Label otherwise picks a
        CUDA device that does not exist), and a request of one tile (the click tool's) or on a plain image (which
        MONAI Label hands to ``infer`` whole) is answered by the infer task directly, with the ASAP XML / DSA JSON
        the plugins parse.
        """
        import torch
        from monailabel.utils.others.generic import is_openslide_supported
        from monailabel.utils.others.pathology import create_asap_annotations_xml, create_dsa_annotations_json

        request = dict(request)
        model = request.get("model")
        self._check_model(model)
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise HTTPException(status_code=400, detail=NO_SLIDE)
        path = self._image_path(image, datastore)
        try:
            (_, _, w, h), (tile_w, tile_h) = check_wsi_request(request, path)
        except SPPNetError as err:
            raise HTTPException(status_code=400, detail=without_folders(str(err), path)) from err
        if not torch.cuda.is_available():
            request.update(multi_gpu=False, device="cpu")
        request[CANCEL_COUNT] = self.segmenter.cancel_count  # DELETE /infer/regions stops all its tiles
        # One tile (a click tool request): answered here, without MONAI Label's tiling, which opens the slide
        # again; several tiles go through MONAI Label. A plain image is one tile whatever its size.
        if is_openslide_supported(path) and not (w and h and w <= tile_w and h <= tile_h):
            return super().infer_wsi(request, datastore)
        tile = self.infer({**request, "image": path, "result_write_to_file": False}, datastore)["params"]
        result = {
            "annotations": [tile], "name": f"MONAILabel Annotations - {model}", "description": self._infers[model].description,
            "model": model, "location": request.get("location"), "size": request.get("size"), "latencies": tile["latencies"],
        }
        writer = {"asap": create_asap_annotations_xml, "dsa": create_dsa_annotations_json}.get(request.get("output"))
        return {"file": writer(result)[0] if writer else None, "params": result}

    def train(self, request):
        # MONAI Label calls this in the server for run_sync=true: train in a child process instead, as
        # its background tasks do, so that the server does not keep the training's memory.
        if self._server_mode:
            return train_in_subprocess(request)
        return super().train(request)

    def on_init_complete(self):
        super().on_init_complete()
        from monailabel.app import app  # the server's FastAPI app: this runs only in the server

        routes.install(app)

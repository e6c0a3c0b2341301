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

import json
import logging
import os
from pathlib import Path
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.engine import ClickSegmenter
from lib.infer import SPPNetClickInfer
from lib.train import SPPNetTrain

logger = logging.getLogger(__name__)

MODEL_NAME = "sppnet"


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
        return {MODEL_NAME: SPPNetClickInfer(self.segmenter)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {MODEL_NAME: SPPNetTrain(str(self.bundle_dir), self.train_configs, self.train_defaults)}

    def infer(self, request, datastore=None):
        # MONAI Label maps an unknown image id to "" and lets the task fail; answer 404 naming the id.
        image = request.get("image")
        store = datastore if datastore else self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and not store.get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"unknown image id {image!r}: GET /datastore/?output=all lists the ids.")
        if request.get("model") and request["model"] not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {request['model']!r}; available: {sorted(self._infers)}")
        return super().infer(request, datastore)

    def on_init_complete(self):
        super().on_init_complete()
        _answer_bad_json_with_400()


def _answer_bad_json_with_400() -> None:
    """``params`` that are not JSON fail in MONAI Label's endpoint (``json.loads``) before the app runs,
    as a bare 500; register a handler that answers 400 with the reason instead."""
    try:
        from fastapi.responses import JSONResponse
        from monailabel.app import app as fastapi_app
    except Exception:  # not running inside the server (e.g. the train subprocess)
        return

    async def bad_json(request, exc: json.JSONDecodeError):
        return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})

    if json.JSONDecodeError not in fastapi_app.exception_handlers:
        fastapi_app.add_exception_handler(json.JSONDecodeError, bad_json)
        fastapi_app.middleware_stack = None  # Starlette built it at startup; rebuild it with the handler

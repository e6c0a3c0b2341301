"""The app's handlers in front of two MONAI Label routes, installed by :func:`install` at server start.

- ``POST /infer/{model}``: a request without an image, or with ``params`` that are not a JSON object,
  fails inside MONAI Label's handler as a bare 500; here it is a 400 with the reason, as are ``params``
  that are not JSON (:func:`answer_bad_json_with_400`).
- ``POST /train/{model}``: the parameters are checked (:func:`lib.train.train_overrides`) before a
  training starts, a bad one is a 400 with the reason. The handler is a plain ``def``, which FastAPI
  runs in its threadpool: a ``run_sync=true`` training (in a child process, see ``SPPNetApp.train``)
  waits there instead of holding the event loop that answers ``/infer``.
- ``PUT /datastore/label``: a final label is checked before it is stored (:meth:`SPPNetApp.check_label`, the
  training's own conversion): a label that cannot train anything is a 400 with the reason and nothing is stored.
- ``POST /infer/wsi_v2/{model}``: as ``/infer/wsi``, for a slide uploaded with the request.
- ``POST /activelearning/{strategy}``: 404 for an unknown strategy; the strategy runs in the threadpool.
- ``GET /infer/regions`` (progress of the running region requests) and ``DELETE /infer/regions`` (stop them
  at their next tile; each answers 409).

Inference runs in FastAPI's threadpool, not on the event loop: ``/info/`` and clicks are answered while a
rectangle or a whole slide is segmented, and the engine serves clicks before the region's next tile
(:class:`lib.engine.ClicksFirst`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.endpoints import activelearning as monailabel_activelearning
from monailabel.endpoints import datastore as monailabel_datastore
from monailabel.endpoints import infer as monailabel_infer
from monailabel.endpoints import wsi_infer as monailabel_wsi_infer
from monailabel.endpoints import train as monailabel_train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool

from lib.infer import NO_SLIDE
from lib.train import TrainingFailed, TrainRequestError, train_overrides

# One run_sync training at a time: MONAI Label refuses a second background training (429) but cannot
# see this one, and two runs would share the datalist and, within a second, the run folder.
_sync_training = threading.Lock()


async def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[monailabel_infer.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """MONAI Label's ``/infer/{model}`` handler after checking the image and params (400 with the reason)."""
    if not (image or file or session_id):
        raise HTTPException(status_code=400, detail="no image: give image=<image id> (GET /datastore/?output=all lists them), a file or a session_id.")
    if not isinstance(json.loads(params or "{}"), dict):  # not JSON at all: answer_bad_json_with_400
        raise HTTPException(status_code=400, detail=f"params must be a JSON object, e.g. {{\"foreground\": [[x, y]]}}, got {params[:100]!r}.")
    # In the threadpool, not on the event loop: other requests are answered meanwhile.
    return await run_in_threadpool(monailabel_infer.run_inference, background_tasks, model, image, session_id, params, file, label, output)


async def infer_wsi(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    wsi: monailabel_wsi_infer.WSIInput = monailabel_wsi_infer.WSIInput(),
    output: Optional[monailabel_wsi_infer.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """MONAI Label's ``/infer/wsi/{model}`` handler (QuPath, DSA) after checking that a slide is named (400)."""
    if not (image or session_id):
        raise HTTPException(status_code=400, detail=NO_SLIDE)
    return await run_in_threadpool(monailabel_wsi_infer.run_wsi_inference, background_tasks, model, image, session_id, None, wsi, output)


async def infer_wsi_v2(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    file: UploadFile = File(None),
    wsi: str = Form(monailabel_wsi_infer.WSIInput().model_dump_json()),
    output: Optional[monailabel_wsi_infer.ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
) -> Any:
    """MONAI Label's ``/infer/wsi_v2/{model}`` (a slide uploaded as ``file``, QuPath's path for images the server
    does not hold), in the threadpool as ``/infer/wsi``."""
    if not (image or file or session_id):
        raise HTTPException(status_code=400, detail=NO_SLIDE)
    try:
        region = monailabel_wsi_infer.WSIInput.parse_obj(json.loads(wsi))
    except ValueError as err:
        raise HTTPException(status_code=400, detail=f"wsi is not a valid region request: {str(err).splitlines()[0]}") from None
    return await run_in_threadpool(monailabel_wsi_infer.run_wsi_inference, background_tasks, model, image, session_id, file, region, output)


def train(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
) -> Any:
    """MONAI Label's ``/train/{model}`` handler after checking the model and params (404 / 400 with the
    reason); 429 while another run_sync training runs, 500 with the reason when the training fails."""
    trainers = app_instance().info()["trainers"]
    if model not in trainers:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r} for /train; available: {sorted(trainers)}")
    try:
        train_overrides(params or {})
    except TrainRequestError as err:
        raise HTTPException(status_code=400, detail=str(err)) from None
    if not _sync_training.acquire(blocking=False):
        raise HTTPException(status_code=429, detail="a training started with run_sync=true is running; try again when it has finished.")
    try:
        return monailabel_train.run_model(model, params, run_sync, enqueue)  # run_sync: the result, else the background task
    except TrainingFailed as err:
        raise HTTPException(status_code=500, detail=str(err)) from None
    finally:
        _sync_training.release()


def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
) -> Any:
    """MONAI Label's ``PUT /datastore/label`` after checking that a final label can train (400 with the reason,
    nothing stored); the answer adds the number of nuclei it holds."""
    checked = {}
    if (tag or "final") == "final":
        if not label.filename:  # MONAI Label would store it as .nii.gz, which no training reads
            raise HTTPException(status_code=400, detail="give the label file a name with its suffix (.xml, .json, .png, ...).")
        suffix = "".join(Path(label.filename).suffixes)  # as MONAI Label stores it
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"label{suffix}")
            with open(path, "wb") as out:
                shutil.copyfileobj(label.file, out)
            checked = app_instance().check_label(image, path)
        label.file.seek(0)
    return {**monailabel_datastore.save_label(background_tasks, image, params, tag, label, user.username), **checked}


def next_sample(
    strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
) -> Any:
    """MONAI Label's ``/activelearning/{strategy}`` (QuPath's Next Sample), 404 for an unknown strategy."""
    strategies = app_instance().info()["strategies"]
    if strategy not in strategies:
        raise HTTPException(status_code=404, detail=f"unknown strategy {strategy!r}; available: {sorted(strategies)}")
    answer = monailabel_activelearning.sample(strategy, params, user.username)
    answer.pop("path", None)  # MONAI Label adds the image's file: a server path, of no use to a client
    return answer


def region_progress(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Any:
    """The running region requests: image, area, tiles done of all."""
    return {"regions": list(app_instance().segmenter.regions.values())}


def cancel_regions(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Any:
    """Stop the running region requests at their next tile (each answers 409)."""
    return {"cancelled": app_instance().segmenter.cancel_regions()}


def answer_bad_json_with_400(app: FastAPI) -> None:
    """``params`` that are not JSON fail in MONAI Label's endpoint (``json.loads``) before the app runs,
    as a bare 500; register a handler that answers 400 with the reason instead."""

    async def bad_json(request, exc: json.JSONDecodeError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": f"params is not valid JSON: {exc}"})

    if json.JSONDecodeError not in app.exception_handlers:
        app.add_exception_handler(json.JSONDecodeError, bad_json)
        app.middleware_stack = None  # Starlette built it at startup; rebuild it with the handler


def install(app: FastAPI) -> None:
    """Serve MONAI Label's ``/infer/{model}`` and ``/train/{model}`` with this module's handlers, and
    ``params`` that are not JSON with a 400, in ``app`` (the server's FastAPI app)."""
    prefix = settings.MONAI_LABEL_API_STR
    _serve_first(app, f"{prefix}/infer/{{model}}", "POST", infer)
    _serve_first(app, f"{prefix}/infer/wsi/{{model}}", "POST", infer_wsi)
    _serve_first(app, f"{prefix}/infer/wsi_v2/{{model}}", "POST", infer_wsi_v2)
    _serve_first(app, f"{prefix}/train/{{model}}", "POST", train)
    _serve_first(app, f"{prefix}/datastore/label", "PUT", save_label)
    _serve_first(app, f"{prefix}/activelearning/{{strategy}}", "POST", next_sample)
    _serve_first(app, f"{prefix}/infer/regions", "GET", region_progress)
    _serve_first(app, f"{prefix}/infer/regions", "DELETE", cancel_regions)
    answer_bad_json_with_400(app)


def _serve_first(app: FastAPI, path: str, method: str, endpoint: Callable[..., Any]) -> None:
    """Route ``method path`` to ``endpoint`` ahead of MONAI Label's route for it: the app tries its routes
    in order. (Recent FastAPI keeps included routes in their own routers, out of reach of the app's
    list; the shadowed route, with the same parameters, stays in the API docs.)"""
    app.router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    app.router.routes.insert(0, app.router.routes.pop())

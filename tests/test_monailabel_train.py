"""The MONAI Label app's answers to bad /train and /infer requests, and /train run_sync in a child process.

A real server on 127.0.0.1 (the fixtures of ``tests/test_monailabel.py``). Skipped unless ``monailabel``
is installed; ``tests/test_monailabel_env.py`` runs it in that environment.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

import test_monailabel  # noqa: E402
from test_monailabel import MODEL, _centre, _infer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))
from serve import rss_kib  # noqa: E402

# Its fixtures: a server of this module's own, on demo images and a bundle trained 2 epochs at image_size 64.
workdir, server = test_monailabel.workdir, test_monailabel.server

pytestmark = pytest.mark.slow


def _train(url: str, params: dict, run_sync: bool = True, model: str = MODEL) -> requests.Response:
    return requests.post(f"{url}/train/{model}", params={"run_sync": str(run_sync).lower()}, json=params, timeout=600)


@pytest.mark.parametrize("run_sync", [False, True])
@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_epochs": 0}, "max_epochs must be a positive integer"),
        ({"max_epochs": "ten"}, "max_epochs must be a positive integer"),
        ({"max_epochs": 1.5}, "max_epochs must be a positive integer"),
        ({"val_interval": -1}, "val_interval must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"learning_rate": "nan"}, "learning_rate must be a positive number"),
        ({"image_size": 100}, "image_size must be a multiple of 16"),
    ],
)
def test_bad_train_params_are_400_and_start_nothing(server, params, message, run_sync):
    url, proc = server
    response = _train(url, {"max_epochs": 1, **params}, run_sync=run_sync)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    running = requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30)
    assert running.status_code == 404, f"a training was started: {running.text}"
    assert proc.poll() is None


def test_train_of_unknown_model_is_404(server):
    url, _ = server
    response = _train(url, {"max_epochs": 1}, model="nope")
    assert response.status_code == 404 and "unknown model" in response.json()["detail"]


@pytest.mark.parametrize(
    "image, params, message",
    [
        (None, {"foreground": [[5, 5]]}, "no image"),
        ("", {"foreground": [[5, 5]]}, "no image"),
        ("demo_000", "[1, 2]", "params must be a JSON object"),
        ("demo_000", "3", "params must be a JSON object"),
        ("demo_000", "null", "params must be a JSON object"),
    ],
)
def test_infer_without_image_or_with_params_not_an_object_is_400(server, workdir, image, params, message):
    url, proc = server
    response = _infer(url, image, params)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert _infer(url, "demo_000", {"foreground": [_centre(workdir, "demo_000")]}).status_code == 200
    assert proc.poll() is None


def test_one_epoch_with_val_interval_4_writes_a_model(server, workdir):
    url, _ = server
    model = workdir / "bundle" / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    response = _train(url, {"max_epochs": 1, "val_interval": 4, "batch_size": 2})
    assert response.status_code == 200, response.text
    result = response.json()
    assert (workdir / "bundle" / "models" / "monailabel_runs" / result["run_dir"] / "model.pt").is_file()  # a model was written
    assert (model.stat().st_mtime_ns != before) == result["served_new_model"]
    assert any("val_interval 4 is more than max_epochs 1" in note for note in result["notes"])


def test_sync_training_runs_in_a_child_process_while_the_server_answers_clicks(server, workdir):
    url, proc = server
    click = {"foreground": [_centre(workdir, "demo_002")]}
    for _ in range(3):  # warm-up: the model loaded, this window's embedding cached
        assert _infer(url, "demo_002", click).status_code == 200
    before = rss_kib(proc.pid)
    runs = workdir / "bundle" / "models" / "monailabel_runs"
    old_runs = set(runs.glob("*"))
    trained: dict = {}

    def train() -> None:
        trained["response"] = _train(url, {"max_epochs": 1, "val_interval": 1, "batch_size": 2})
        trained["end"] = time.monotonic()

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    while thread.is_alive() and set(runs.glob("*")) == old_runs:  # the child has started the run
        assert time.monotonic() < deadline, "no training run started"
        time.sleep(0.2)
    start = time.monotonic()
    during = _infer(url, "demo_002", click)
    answered = time.monotonic()
    thread.join()
    after = rss_kib(proc.pid)
    assert trained["response"].status_code == 200, trained["response"].text
    assert during.status_code == 200, during.text
    print(f"\ninfer during training: {answered - start:.2f} s, training ended {trained['end'] - answered:.2f} s later; "
          f"server RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
    assert answered < trained["end"], "the click was answered only after the training"
    assert after - before < 128 * 1024, f"the server grew from {before} to {after} KiB over a training"

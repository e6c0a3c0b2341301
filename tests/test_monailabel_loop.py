"""The annotation loop over HTTP, as QuPath plays it against a real server: upload a patch, submit its ASAP XML,
refused bad labels, Next Sample on unlabelled tissue, /train on the corrections, the new model served or the
reason why not; and a click answered while a large rectangle is segmented.

Skipped unless ``monailabel`` is installed; ``tests/test_monailabel_env.py`` runs it in that environment.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from PIL import Image  # noqa: E402

import test_monailabel  # noqa: E402
from sppnet_monai.data.synthetic import write_nuclei_slide  # noqa: E402
from sppnet_monai.data.labels import instances_to_asap_xml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))
from serve import running_server  # noqa: E402

workdir = test_monailabel.workdir  # a workdir of this module's own
pytestmark = pytest.mark.slow
PATCH = 64
LABELLED = [(0, 0), (64, 0), (128, 0), (0, 64)]  # patches of the 192x128 mosaic submitted as corrections


# Absolute slide coordinates sent for a patch at (0, 0): the outline lies outside the patch.
OUTSIDE_XML = (
    '<ASAP_Annotations><Annotations X="0" Y="0" W="64" H="64"><Annotation Name="Nucleus" Type="Polygon"><Coordinates>'
    + "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate([(300, 300), (310, 300), (310, 310)]))
    + "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
)


def mosaic_truth(root: Path) -> np.ndarray:
    """The instance map of the studies' mosaic (the first six demo labels, as the fixture tiles their images)."""
    labels = [np.asarray(Image.open(p)).astype(np.int64) for p in sorted((root / "demo" / "labels").glob("*.png"))[:6]]
    for index, label in enumerate(labels):
        label[label > 0] += 1000 * index
    return np.concatenate([np.concatenate(labels[:3], 1), np.concatenate(labels[3:], 1)], 0)


@pytest.fixture(scope="module")
def server(workdir):
    for label in (workdir / "studies" / "labels" / "final").glob("*"):
        label.unlink()  # the loop starts with no final label
    with running_server(workdir, workdir / "studies", workdir / "bundle") as running:
        yield running


def _put_label(url: str, image: str, name: str, content: bytes | str) -> requests.Response:
    return requests.put(
        f"{url}/datastore/label", params={"image": image, "tag": "final"}, files={"label": (name, content)}, timeout=120
    )


def _labels(url: str) -> dict:
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return {image: info["labels"] for image, info in objects.items() if info.get("labels")}


def test_the_qupath_loop(server, workdir):
    url, _ = server
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert {"random", "entropy"} <= set(info["strategies"])
    mosaic = np.asarray(Image.open(workdir / "studies" / "mosaic.png").convert("RGB"))
    truth = mosaic_truth(workdir)

    # Submit Label: the patch (PNG) under QuPath's name, then its polygons as ASAP XML.
    for x, y in LABELLED:
        patch_id = f"mosaic-patch-{x}_{y}_{PATCH}_{PATCH}"
        buffer = io.BytesIO()
        Image.fromarray(mosaic[y : y + PATCH, x : x + PATCH]).save(buffer, format="PNG")
        uploaded = requests.put(f"{url}/datastore/image", params={"image": patch_id}, files={"file": ("patch.png", buffer.getvalue())}, timeout=60)
        assert uploaded.status_code == 200, uploaded.text
        patch_truth = truth[y : y + PATCH, x : x + PATCH]
        saved = _put_label(url, patch_id, f"{patch_id}12345.xml", instances_to_asap_xml(patch_truth, x, y))
        assert saved.status_code == 200, saved.text
        assert saved.json()["nuclei"] == len(np.unique(patch_truth)) - 1

    # Bad labels: 4xx with the reason, nothing stored.
    before = _labels(url)
    patch_id = f"mosaic-patch-0_0_{PATCH}_{PATCH}"
    bad = [
        (patch_id, "a.xml", "<ASAP_Annotations><Annotations>", 400, "not valid ASAP XML"),
        (patch_id, "a.xml", "<ASAP_Annotations><Annotations X='0' Y='0' W='64' H='64'/></ASAP_Annotations>", 400, "no nucleus outline"),
        (patch_id, "a.xml", instances_to_asap_xml(truth[:64, :64], 0, 0).replace('W="64" H="64"', 'W="128" H="64"'), 400, "patch is 128x64"),
        (patch_id, "a.xml", OUTSIDE_XML, 400, "outlines lie outside the 64x64 image"),
        ("nope", "a.xml", instances_to_asap_xml(truth[:64, :64], 0, 0), 404, "unknown image id"),
        ("demo_000", "a.png", b"not a png", 400, "demo_000:"),
    ]
    for image, name, content, status, reason in bad:
        response = _put_label(url, image, name, content)
        assert response.status_code == status and reason in response.json()["detail"], (reason, response.text)
        assert str(workdir) not in response.text
    assert _labels(url) == before

    # Next Sample: a patch of the mosaic on tissue, not one of the labelled ones.
    for strategy in ("random", "entropy"):
        sample = requests.post(
            f"{url}/activelearning/{strategy}", json={"image": "mosaic", "patch_size": [PATCH, PATCH], "image_size": [192, 128]}, timeout=120
        )
        assert sample.status_code == 200, sample.text
        x, y, w, h = sample.json()["bbox"]
        assert sample.json()["id"] == "mosaic" and (w, h) == (PATCH, PATCH) and (x, y) in [(64, 64), (128, 64)]
    unknown = requests.post(f"{url}/activelearning/nope", json={}, timeout=30)
    assert unknown.status_code == 404 and "unknown strategy" in unknown.json()["detail"]

    # Train on the corrections; the new model is served only if it holds up on the held-back patch.
    model = workdir / "bundle" / "models" / "model.pt"
    stamp = model.stat().st_mtime_ns
    trained = requests.post(f"{url}/train/sppnet", params={"run_sync": "true"}, json={"max_epochs": 2, "val_interval": 1}, timeout=900)
    assert trained.status_code == 200, trained.text
    result = trained.json()
    assert result["images"] == 4 and result["validation"] == 1 and "held-back dice" in result["why"]
    assert (model.stat().st_mtime_ns != stamp) == result["served_new_model"]
    click = requests.post(f"{url}/infer/sppnet", params={"image": "demo_001", "output": "json"}, data={"params": '{"foreground": [[30, 30]]}'}, timeout=60)
    assert click.status_code == 200, click.text


def test_background_training_shows_progress_stops_and_resumes(server, workdir):
    url, _ = server
    params = {"max_epochs": 40, "val_interval": 40}
    started = requests.post(f"{url}/train/sppnet", json=params, timeout=60)
    assert started.status_code == 200, started.text
    details = []
    for _ in range(600):
        task = requests.get(f"{url}/train/", timeout=30).json()
        details = list(task.get("details", []))
        if any("Epoch: 2/40" in line for line in details) or task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.2)
    assert task["status"] == "RUNNING" and any("Epoch: 2/40" in line for line in details), details[-5:]
    requests.delete(f"{url}/train/", timeout=60).raise_for_status()
    for _ in range(100):
        if requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404:
            break
        time.sleep(0.2)
    runs = sorted((workdir / "bundle" / "models" / "monailabel_runs").iterdir())
    stopped = runs[-1]
    assert not (stopped / "result.json").exists() and list(stopped.glob("checkpoint_epoch=*.pt"))
    resumed = requests.post(f"{url}/train/sppnet", params={"run_sync": "true"}, json=params, timeout=900)
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["resumed"] is True and resumed.json()["run_dir"] == stopped.name


def test_a_click_is_answered_while_a_rectangle_runs(server, workdir):
    url, _ = server
    # A slide, so that MONAI Label cuts the rectangle into 128 tiles, each one step of the engine's gate.
    rng = np.random.default_rng(0)
    slide = workdir / "big.tif"
    write_nuclei_slide(slide, 1024, 1024, rng.uniform(20, 1004, (600, 2)), radius=7.0, levels=2, tile=128)
    # Uploaded, not dropped into the studies folder: MONAI Label 0.8.5's folder watcher thread can die on a race
    # with an upload ("dictionary changed size during iteration") and then never notices a new file.
    with open(slide, "rb") as f:
        uploaded = requests.put(f"{url}/datastore/image", params={"image": "big"}, files={"file": ("big.tif", f)}, timeout=60)
    assert uploaded.status_code == 200, uploaded.text
    answer = {}

    def rectangle():
        answer["region"] = requests.post(
            f"{url}/infer/wsi/sppnet", params={"image": "big", "output": "json"},
            json={"location": [0, 0], "size": [1024, 1024], "tile_size": [128, 128], "level": 0, "params": {"max_workers": 1}}, timeout=600,
        )

    worker = threading.Thread(target=rectangle)
    worker.start()
    progress = {}
    for _ in range(200):
        progress = requests.get(f"{url}/infer/regions", timeout=30).json()
        if progress["regions"] or not worker.is_alive():
            break
        time.sleep(0.05)
    start = time.perf_counter()
    click = requests.post(f"{url}/infer/sppnet", params={"image": "demo_001", "output": "json"}, data={"params": '{"foreground": [[30, 30]]}'}, timeout=60)
    latency = time.perf_counter() - start
    info = requests.get(f"{url}/info/", timeout=30)
    region_running = worker.is_alive()
    worker.join()
    assert click.status_code == 200 and info.status_code == 200
    assert answer["region"].status_code == 200, answer["region"].text
    assert region_running, f"the rectangle ended before the click was timed (progress {progress})"
    assert latency < 5, f"the click waited {latency:.1f} s behind the rectangle"

"""The MONAI Label app (monailabel_app/): a real server on 127.0.0.1, clicks over REST, a tiny trained bundle.

Skipped unless the ``monailabel`` pip package is installed (it is not in requirements.txt: it pins
numpy 1.26); ``tests/test_monailabel_env.py`` builds its virtual environment and runs this file there.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from monai.bundle import ConfigWorkflow  # noqa: E402
from PIL import Image  # noqa: E402

from sppnet_monai.data.prepare import prepare_demo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))
from serve import rss_kib, running_server  # noqa: E402
from sppnet_monai.transforms.prompt import nucleus_center  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
APP = REPO / "monailabel_app"
MODEL = "sppnet"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Demo images as the studies folder (plus one 192x128 mosaic, larger than the network input) and a
    bundle folder (the repository's configs + 2 epochs of training at image_size 64)."""
    root = tmp_path_factory.mktemp("monailabel")
    demo = root / "demo"
    prepare_demo(demo, num_images=8, image_size=64, seed=0, val_fraction=0.25)
    bundle = root / "bundle"
    shutil.copytree(CONFIGS, bundle / "configs")
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "fast_cpu.json")], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train", bundle_root=str(bundle), dataset_dir=str(demo),
        image_size=64, batch_size=2, max_epochs=2, val_interval=1,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (bundle / "models" / "model.pt").is_file()
    studies = root / "studies"
    studies.mkdir()
    for image in sorted((demo / "images").glob("*.png")):
        shutil.copy(image, studies / image.name)
    final = studies / "labels" / "final"  # finished labels in the datastore, for /train
    final.mkdir(parents=True)
    for label in sorted((demo / "labels").glob("*.png")):
        shutil.copy(label, final / label.name)
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((demo / "images").glob("*.png"))[:6]]
    Image.fromarray(np.concatenate([np.concatenate(tiles[:3], 1), np.concatenate(tiles[3:], 1)], 0)).save(studies / "mosaic.png")
    return root


@pytest.fixture(scope="module")
def server(workdir):
    with running_server(workdir, workdir / "studies", workdir / "bundle") as running:
        yield running


def _infer(url: str, image: str, params, output: str = "json", model: str = MODEL) -> requests.Response:
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": output}, data=data, timeout=120)


def _centre(workdir: Path, name: str, instance: int = 1) -> list[int]:
    label = np.asarray(Image.open(workdir / "demo" / "labels" / f"{name}.png"))
    return list(nucleus_center(label == instance))


def test_info_lists_the_model(server):
    url, _ = server
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert MODEL in info["models"]
    assert MODEL in info["trainers"]


def test_click_returns_mask_covering_the_nucleus_then_reuses_the_embedding(server, workdir):
    url, _ = server
    x, y = _centre(workdir, "demo_003")
    first = _infer(url, "demo_003", {"foreground": [[x, y]]})
    assert first.status_code == 200, first.text
    result = first.json()
    assert result["windows"][0]["embedding_cached"] is False
    assert result["windows"][0]["background_auto"] is True and len(result["windows"][0]["background"]) == 1
    runs = result["encoder_runs"]
    assert result["nuclei_count"] >= 1 and result["nuclei"][0]["contour"]

    image = _infer(url, "demo_003", {"foreground": [[x, y]]}, output="image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    from io import BytesIO

    mask = np.asarray(Image.open(BytesIO(image.content)))
    assert mask.shape == (64, 64)
    assert mask[y, x] == 1, "the returned mask does not cover the clicked nucleus"
    assert any(  # the clicked pixel lies inside one returned nucleus contour's bounding box
        min(p[0] for p in n["contour"]) <= x <= max(p[0] for p in n["contour"])
        and min(p[1] for p in n["contour"]) <= y <= max(p[1] for p in n["contour"])
        for n in result["nuclei"]
    )

    # A second click elsewhere on the same image, with a user background click: no encoder run.
    x2, y2 = _centre(workdir, "demo_003", 2)
    second = _infer(url, "demo_003", {"foreground": [[x2, y2]], "background": [[0, 0]]}).json()
    assert second["windows"][0]["embedding_cached"] is True
    assert second["windows"][0]["background_auto"] is False and second["windows"][0]["background"] == [[0, 0]]
    assert second["encoder_runs"] == runs


def test_window_pixels_are_the_bundles_rgb(workdir, tmp_path, monkeypatch):
    """An RGBA image: the app encodes the pixels prepare and the bundle read (alpha over white)."""
    monkeypatch.syspath_prepend(str(APP))
    from lib.engine import ClickSegmenter

    from sppnet_monai.data.image_io import to_rgb_uint8

    rgb = np.asarray(Image.open(workdir / "demo" / "images" / "demo_003.png").convert("RGB"))
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))[..., None]
    rgba = np.concatenate([rgb, alpha], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    segmenter = ClickSegmenter(workdir / "bundle")
    segmenter.segment(tmp_path / "rgba.png", [[32, 32]])
    (entry,) = segmenter._cache.values()
    np.testing.assert_array_equal(np.round(np.asarray(entry["rgb"])), np.moveaxis(to_rgb_uint8(rgba), -1, 0))


def test_large_image_is_processed_in_the_clicks_window(server):
    url, _ = server
    result = _infer(url, "mosaic", {"foreground": [[150, 100]]}).json()
    assert result["image_size"] == [192, 128]
    assert result["windows"][0]["window"] == [128, 64, 64, 64]  # 64x64 around the click, not a resize
    both = _infer(url, "mosaic", {"foreground": [[150, 100], [10, 10]]}).json()
    assert [w["embedding_cached"] for w in both["windows"]] == [True, False]
    assert both["encoder_runs"] == result["encoder_runs"] + 1


@pytest.mark.parametrize(
    "image, params, status, message",
    [
        ("demo_000", {}, 400, "at least one foreground click"),
        ("demo_000", {"foreground": []}, 400, "at least one foreground click"),
        ("demo_000", {"foreground": [[64, 5]]}, 400, "outside"),
        ("demo_000", {"foreground": [[5, 5]], "background": [[-1, 5]]}, 400, "outside"),
        ("demo_000", {"foreground": "abc"}, 400, "list of [x, y] pairs"),
        ("demo_000", {"foreground": [[1]]}, 400, "list of [x, y] pairs"),
        ("demo_000", {"foreground": [["a", 2]]}, 400, "list of [x, y] pairs"),
        ("demo_000", "not json", 400, "not valid JSON"),
        ("no_such_image", {"foreground": [[5, 5]]}, 404, "unknown image id"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, workdir, image, params, status, message):
    url, proc = server
    response = _infer(url, image, params)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert proc.poll() is None
    ok = _infer(url, "demo_000", {"foreground": [_centre(workdir, "demo_000")]})
    assert ok.status_code == 200, ok.text


def test_unknown_model_is_404(server):
    url, _ = server
    response = _infer(url, "demo_000", {"foreground": [[5, 5]]}, model="nope")
    assert response.status_code == 404 and "unknown model" in response.json()["detail"]


def test_memory_is_stable_over_50_clicks(server, workdir):
    url, proc = server
    label = np.asarray(Image.open(workdir / "demo" / "labels" / "demo_005.png"))
    centres = [list(nucleus_center(label == i)) for i in np.unique(label) if i]
    for i in range(5):  # warm-up: allocator pools, first-call caches
        assert _infer(url, "demo_005", {"foreground": [centres[i % len(centres)]]}).status_code == 200
    before = rss_kib(proc.pid)
    for i in range(50):
        response = _infer(url, "demo_005", {"foreground": [centres[i % len(centres)]]}, output="all")
        assert response.status_code == 200, response.text
    after = rss_kib(proc.pid)
    runs = _infer(url, "demo_005", {"foreground": [centres[0]]}).json()["encoder_runs"]
    print(f"\nserver RSS before 50 clicks: {before / 1024:.1f} MiB, after: {after / 1024:.1f} MiB, growth {(after - before) / 1024:.1f} MiB; encoder runs so far {runs}")
    assert after - before < 64 * 1024, f"RSS grew from {before} KiB to {after} KiB over 50 clicks"


def test_train_runs_the_bundle_training_on_the_datastore_and_the_gate_decides_what_is_served(server, workdir):
    """Last in this module: it may replace the served model (only if it holds up on the held-back images)."""
    url, proc = server
    model = workdir / "bundle" / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    x, y = _centre(workdir, "demo_001")
    assert _infer(url, "demo_001", {"foreground": [[x, y]]}).json()["windows"][0]["window"] == [0, 0, 64, 64]
    response = requests.post(
        f"{url}/train/{MODEL}", params={"run_sync": "true"},
        json={"max_epochs": 1, "batch_size": 2, "val_interval": 1}, timeout=600,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert (model.stat().st_mtime_ns != before) == result["served_new_model"], response.text[-2000:]
    verdict = "serving the new model" if result["served_new_model"] else "keeping the served model"
    assert result["why"].startswith(verdict) and "held-back dice" in result["why"]
    new, served = result["held_back"]["new"]["dice"], result["held_back"]["served"]["dice"]
    assert (new >= served) == result["served_new_model"]
    assert list((workdir / "bundle" / "models" / "monailabel_runs").glob("*/model.pt"))
    datalist = json.loads((workdir / "bundle" / "data" / "monailabel" / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 8  # the labelled demo images, not the mosaic
    after = _infer(url, "demo_001", {"foreground": [[x, y]]})
    assert after.status_code == 200, after.text
    # New weights: embeddings recomputed; the same weights: the cached embedding answers.
    assert after.json()["windows"][0]["embedding_cached"] is (not result["served_new_model"])
    assert proc.poll() is None

"""The MONAI Label app's engine (monailabel_app/lib/engine.py), which imports no MONAI Label: windows, cache,
clicks, contours and bad clicks, in the default suite. The real server is tested in test_monailabel.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet_monai.networks import SPPNet
from sppnet_monai.utils import SPPNetError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))

from sppnet_monai.nuclei import nuclei_records  # noqa: E402
from lib.engine import ClickSegmenter, ImageNotFoundError, choose_window, parse_clicks  # noqa: E402

SIZE = 64


def _bundle_folder(root: Path, **network) -> Path:
    """``root`` as a bundle folder: the repository's configs and an untrained SPPNet at image_size 64 (its recipe recorded)."""
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(SPPNet(image_size=SIZE, **network).state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _bundle_folder(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A 160x96 (WxH) H&E-like picture: larger than the network input, so clicks get windows."""
    rng = np.random.default_rng(0)
    rgb = np.full((96, 160, 3), (235, 200, 220), np.uint8)
    for cy, cx in rng.integers(8, (88, 152), size=(25, 2)):
        yy, xx = np.ogrid[:96, :160]
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = (90, 50, 140)
    path = tmp_path_factory.mktemp("images") / "tile.png"
    Image.fromarray(rgb).save(path)
    return path


def test_window_grid_keeps_the_click_away_from_the_edge():
    assert choose_window(10, 10, 160, 96, 64) == (0, 0, 64, 64)
    assert choose_window(150, 90, 160, 96, 64) == (96, 32, 64, 64)  # flush with the right/bottom border
    x0, y0, w, h = choose_window(80, 50, 160, 96, 64)
    assert 16 <= 80 - x0 <= 48 and 16 <= 50 - y0 <= 48 and (x0 % 32, w, h) == (0, 64, 64)
    assert choose_window(5, 5, 40, 30, 64) == (0, 0, 40, 30)  # an image smaller than the window


def test_parse_clicks_accepts_lists_and_json_and_rejects_the_rest():
    assert parse_clicks([[1, 2], [3.5, 4, 0]], "foreground") == [[1, 2], [3.5, 4]]
    assert parse_clicks("[[1, 2]]", "foreground") == [[1, 2]]
    assert parse_clicks(None, "background") == [] and parse_clicks("", "background") == []
    for bad in ("abc", 5, [[1]], [["a", 2]], [[True, 2]]):
        with pytest.raises(SPPNetError, match=r"list of \[x, y\] pairs"):
            parse_clicks(bad, "foreground")


def test_click_is_answered_from_its_window_then_from_the_cache(bundle, image):
    segmenter = ClickSegmenter(bundle, cache_size=4)
    mask, instances, info = segmenter.segment(image, [[150, 90]])
    assert mask.shape == (96, 160) and instances.shape == (96, 160)
    assert info["windows"][0]["window"] == [96, 32, 64, 64] and info["encoder_runs"] == 1
    assert not mask[:, :96].any() and not mask[:32].any()  # nothing outside the clicked window
    assert info["windows"][0]["background_auto"] and info["windows"][0]["background"]
    again = segmenter.segment(image, [[150, 90]])
    assert again[2]["windows"][0]["embedding_cached"] and again[2]["encoder_runs"] == 1
    np.testing.assert_array_equal(again[0], mask)  # the cached automatic background gives the same answer
    (entry,) = segmenter._cache.values()
    loaded = segmenter._model().load_image({"image": str(image)})["image"]
    torch.testing.assert_close(entry["rgb"], loaded[:, 32:, 96:], rtol=0, atol=0)  # clicks leave the cached pixels alone
    both = segmenter.segment(image, [[150, 90], [10, 10]])
    assert [w["embedding_cached"] for w in both[2]["windows"]] == [True, False] and both[2]["encoder_runs"] == 2


def test_cache_is_bounded_and_emptied_when_the_model_changes(bundle, image, tmp_path):
    own = tmp_path / "bundle"
    shutil.copytree(bundle, own)
    segmenter = ClickSegmenter(own, cache_size=1)
    segmenter.segment(image, [[10, 10]])
    segmenter.segment(image, [[150, 90]])
    assert len(segmenter._cache) == 1
    segmenter.segment(image, [[10, 10]])
    assert segmenter.encoder_runs == 3  # the first window was evicted
    torch.save(SPPNet(image_size=SIZE).state_dict(), own / "models" / "model.pt")
    segmenter._model_stamp = None  # a new file with the same mtime resolution
    result = segmenter.segment(image, [[10, 10]])[2]
    assert result["windows"][0]["embedding_cached"] is False


def test_user_background_click_is_used_and_reported(bundle, image):
    segmenter = ClickSegmenter(bundle)
    info = segmenter.segment(image, [[20, 20]], [[60, 2], [3, 50]])[2]
    assert info["windows"][0]["background"] == [[60, 2]]  # the first in scan order (top row first)
    assert info["windows"][0]["background_auto"] is False


def test_contours_outline_each_nucleus_in_image_pixels():
    instances = np.zeros((40, 50), np.int32)
    instances[10:20, 30:40] = 1
    instances[25:35, 5:12] = 2
    nuclei = nuclei_records(instances)
    assert [n["id"] for n in nuclei] == [1, 2] and nuclei[0]["area"] == 100
    xs, ys = np.array(nuclei[0]["contour"]).T
    assert 29 <= xs.min() and xs.max() <= 40 and 9 <= ys.min() and ys.max() <= 20
    assert nuclei[1]["centroid"] == [8.0, 29.5] and nuclei[0]["contour"][0] == nuclei[0]["contour"][-1]  # a closed ring
    # Read at level 1 (downsample 2) of a region at (100, 60): level-0 slide pixels; only the kept centroids.
    scaled = nuclei_records(instances, origin=(100, 60), scale=2.0, keep=lambda x, y: x > 20)
    assert [n["id"] for n in scaled] == [1] and scaled[0]["area"] == 400 and scaled[0]["centroid"] == [100 + 2 * 34.5, 60 + 2 * 14.5]


@pytest.mark.parametrize(
    "foreground, background, message",
    [
        ([], [], "at least one foreground click"),
        ([[160, 5]], [], "foreground click [160, 5] is outside"),
        ([[5, 5]], [[-1, 5]], "background click [-1, 5] is outside"),
        ([[5, 95.6]], [], "is outside"),
    ],
)
def test_bad_clicks_are_user_errors(bundle, image, foreground, background, message):
    with pytest.raises(SPPNetError) as err:
        ClickSegmenter(bundle).segment(image, foreground, background)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_image_is_a_user_error(bundle, tmp_path):
    broken = tmp_path / "broken.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(broken)
    broken.write_bytes(broken.read_bytes()[:40])  # a header Pillow accepts, no pixel data
    with pytest.raises(SPPNetError, match="cannot read image broken.png"):
        ClickSegmenter(bundle).segment(broken, [[1, 1]])


def test_missing_image_and_missing_model(bundle, image, tmp_path):
    with pytest.raises(ImageNotFoundError):
        ClickSegmenter(bundle).segment(tmp_path / "nope.png", [[1, 1]])
    empty = tmp_path / "empty"
    shutil.copytree(bundle / "configs", empty / "configs")
    with pytest.raises(SPPNetError, match="no model at .*weights/sppnet_monuseg.pt"):
        ClickSegmenter(empty).segment(image, [[1, 1]])


def test_serves_the_shipped_model_until_one_is_trained(bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle / "configs", root / "configs")
    (root / "weights").mkdir()
    shutil.copy2(bundle / "models" / "model.pt", root / "weights" / "sppnet_monuseg.pt")
    segmenter = ClickSegmenter(root)
    assert segmenter.checkpoint == root / "weights" / "sppnet_monuseg.pt" and segmenter.image_size == SIZE
    (root / "models").mkdir()
    shutil.copy2(bundle / "models" / "model.pt", root / "models" / "model.pt")  # what POST /train writes
    assert segmenter.checkpoint == root / "models" / "model.pt"


@pytest.fixture(scope="module")
def click_head_bundle(tmp_path_factory) -> Path:
    """A bundle folder whose model has the native decoder, the distance head and the click head (untrained)."""
    return _bundle_folder(tmp_path_factory.mktemp("click_bundle"), mask_stride=1, instance_head="distance", click_head=True)


def test_rectangle_answer_splits_with_the_two_maps_of_a_hover_head(tmp_path, image):
    """A model with HoVer-Net's maps (two head channels): overlapping click windows merge both maps, and the
    nuclei are split by them (the same split as the Predictor's on the merged maps)."""
    segmenter = ClickSegmenter(_bundle_folder(tmp_path, mask_stride=1, instance_head="hv", click_head=True))
    predictor = segmenter._model()
    assert predictor.instance_head == "hv" and predictor.clicked_channel == 3
    calls = []
    split = predictor.split_nuclei
    predictor.split_nuclei = lambda mask, head: calls.append((mask, head)) or split(mask, head)
    mask, instances, info = segmenter.segment(image, [[40, 40], [70, 50]])
    assert len(info["windows"]) == 2 and len(calls) == 1
    box_mask, head = calls[0]
    assert head.shape == (2, *box_mask.shape) and 0 <= head.min() and head.max() <= 1
    assert not instances[~mask.astype(bool)].any() and info["nuclei_count"] == instances.max()


def test_click_tool_answers_with_the_clicked_nucleus_alone(click_head_bundle, image):
    """With clicked_only (the click tool), the answer is the click head's nucleus under the click, one per click."""
    segmenter = ClickSegmenter(click_head_bundle)
    predictor = segmenter._model()
    mask, instances, info = segmenter.segment(image, [[150, 90]], clicked_only=True)
    x0, y0, w, h = info["windows"][0]["window"]
    background = [[x - x0, y - y0] for x, y in info["windows"][0]["background"]]
    loaded = predictor.load_image({"image": str(image)})["image"][:, y0 : y0 + h, x0 : x0 + w]
    prompted = predictor.prompt({"image": loaded, "foreground": [[150 - x0, 90 - y0]], "background": background})
    with torch.no_grad(), predictor.autocast():
        logits = predictor.network(prompted[None])[0].float()
    expected = np.zeros_like(instances)
    expected[y0 : y0 + h, x0 : x0 + w] = predictor.clicked_instances(logits, [[150 - x0, 90 - y0]])
    np.testing.assert_array_equal(instances, expected)
    assert instances.max() <= 1 and np.array_equal(mask > 0, instances > 0)
    everything = segmenter.segment(image, [[150, 90]])[1]  # the rectangle's model: every nucleus of the window
    assert everything.max() >= instances.max()

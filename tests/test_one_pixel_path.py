"""One pixel path: bundle inference, ``predict``, ``evaluate``'s scoring and the MONAI Label engine give the same mask."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from sppnet_monai.data.prepare import prepare_demo
from sppnet_monai.evaluate import segment_with_clicks
from sppnet_monai.networks import SPPNet
from sppnet_monai.predict import Predictor, run_predict
from sppnet_monai.utils import SPPNetError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
sys.path.insert(0, str(REPO / "monailabel_app"))

from lib.engine import ClickSegmenter  # noqa: E402

FOREGROUND, BACKGROUND = [[30, 20], [44, 50]], [[2, 60], [1, 3]]  # two of each: the click rule applies too


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(CONFIGS, root / "configs")
    (root / "weights").mkdir()
    torch.manual_seed(3)
    torch.save(SPPNet(image_size=64).state_dict(), root / "weights" / "sppnet_monuseg.pt")  # where the shipped model lives
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("demo")
    prepare_demo(dst, num_images=1, image_size=64, seed=5, val_fraction=0.0)
    return next((dst / "images").glob("*.png"))


def test_same_image_and_clicks_give_the_same_mask_on_every_path(bundle, image, tmp_path):
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({image.name: {"foreground": FOREGROUND, "background": BACKGROUND}}))
    checkpoint = str(bundle / "weights" / "sppnet_monuseg.pt")

    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="infer", bundle_root=str(bundle), input_dir=str(image.parent), clicks_file=str(clicks),
        output_dir=str(tmp_path / "bundle_out"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    masks = {"bundle inference": np.asarray(Image.open(tmp_path / "bundle_out" / f"{image.stem}_seg.png")) > 0}

    run_predict(str(image), str(tmp_path / "predict_out"), checkpoint=checkpoint, clicks=str(clicks))
    masks["predict"] = np.asarray(Image.open(tmp_path / "predict_out" / f"{image.stem}_mask.png")) > 0
    masks["evaluate"] = segment_with_clicks(Predictor(checkpoint), str(image), FOREGROUND, BACKGROUND)[1]
    masks["MONAI Label engine"] = ClickSegmenter(bundle).segment(image, FOREGROUND, BACKGROUND)[0] > 0

    reference = masks["predict"]
    assert 0.02 < reference.mean() < 0.98, "the check needs a mask with both nuclei and background"
    for path, mask in masks.items():
        np.testing.assert_array_equal(mask, reference, err_msg=path)


def test_model_runs_at_the_size_it_was_trained_at_without_being_told(bundle, monkeypatch, tmp_path):
    assert Predictor(str(bundle / "weights" / "sppnet_monuseg.pt")).image_size == 64
    monkeypatch.chdir(tmp_path)  # the default checkpoint is the config's bundle's shipped weights, wherever one runs
    default = Predictor(config=bundle / "configs" / "inference.json")
    assert Path(default.checkpoint) == bundle / "weights" / "sppnet_monuseg.pt" and default.image_size == 64
    assert ClickSegmenter(bundle).image_size == 64


def test_contradicting_image_size_is_a_user_error(bundle, image, tmp_path):
    checkpoint = str(bundle / "weights" / "sppnet_monuseg.pt")
    with pytest.raises(SPPNetError, match=r"trained with image_size 64 \(this network: 128\)"):
        Predictor(checkpoint, image_size=128)
    with pytest.raises(SPPNetError, match="image_size 64"):  # the app answers it with HTTP 400
        ClickSegmenter(bundle, image_size=128).segment(image, [[5, 5]])


def test_old_checkpoint_needs_its_size_and_then_loads(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in SPPNet(image_size=64).state_dict().items() if k != "_extra_state"}, old)
    with pytest.raises(SPPNetError, match="does not record its image_size"):
        Predictor(str(old))
    assert Predictor(str(old), image_size=64).image_size == 64


def test_library_functions_raise_instead_of_exiting(tmp_path):
    """Only the entry points (CLI, bundle run, MONAI Label app) turn a user error into an exit or a status."""
    from sppnet_monai.workflows import datalist_split, load_pretrained, load_trained

    for call in (
        lambda: load_trained(SPPNet(image_size=64), str(tmp_path / "missing.pt")),
        lambda: load_pretrained(SPPNet(image_size=64), str(tmp_path / "missing.pt")),
        lambda: datalist_split(str(tmp_path), "training"),
    ):
        with pytest.raises(SPPNetError):  # not SystemExit
            call()


def test_palette_and_cmyk_images_read_the_same_on_every_path(bundle, tmp_path):
    """The bundle's reader converts colour modes by the rule prepare uses (data.image_io.plain_intensities)."""
    from sppnet_monai.data.image_io import read_rgb

    colours = np.array([[200, 0, 50], [20, 120, 240]], np.uint8)[np.arange(64 * 64).reshape(64, 64) % 2]
    Image.fromarray(colours).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(colours).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    predictor = Predictor(str(bundle / "weights" / "sppnet_monuseg.pt"))
    for name in ("palette.png", "cmyk.jpg"):
        loaded = predictor.load_image({"image": str(tmp_path / name)})["image"]
        np.testing.assert_array_equal(np.moveaxis(np.asarray(loaded), 0, -1), read_rgb(tmp_path / name), err_msg=name)

"""``predict``: the bundle's inference pipeline from the command line, tiling, outputs and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet_monai.data.prepare import prepare_demo
from sppnet_monai.inferers import GLASS_LOGIT, PromptedSlidingWindowInferer
from sppnet_monai.networks import PIXEL_MEAN, PIXEL_STD, SPPNet
from sppnet_monai.predict import Predictor, run_predict
from sppnet_monai.utils import SPPNetError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(SPPNet(image_size=64).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("demo")
    prepare_demo(dst, num_images=3, image_size=64, seed=1)
    return dst / "images"


def test_tiling_matches_a_single_pass_when_the_image_fits():
    torch.manual_seed(0)
    net = SPPNet(image_size=64).eval()
    image = torch.randn(1, 5, 64, 64)
    image[:, 3:] = 0
    image[0, 3, 20, 30] = image[0, 4, 60, 2] = 1.0
    inferer = PromptedSlidingWindowInferer(roi_size=(64, 64), overlap=0.25, mode="gaussian")
    with torch.no_grad():
        assert torch.equal(inferer(image, net), net(image))  # one window: the network's own logits, no blending
        assert torch.equal(inferer(image[..., :40], net), net(image[..., :40]))  # narrower: padded by the network


def test_every_window_gets_a_prompt():
    """A large image is tiled; windows without the user's click get their own clicks."""
    seen = []

    def network(windows):
        seen.append(windows[:, 3:5].flatten(2).amax(dim=2))
        return windows[:, :1]

    rgb = np.full((3, 150, 150), 230.0, np.float32)
    rgb[:, 30:40, 30:40] = 60.0  # dark nuclei in several windows
    rgb[:, 110:120, 100:110] = 60.0
    image = torch.zeros(1, 5, 150, 150)
    image[0, :3] = (torch.from_numpy(rgb) - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    image[0, 3, 35, 35] = 1.0  # the user's click: in the first windows only
    inferer = PromptedSlidingWindowInferer(roi_size=(64, 64), overlap=0.25)
    out = inferer(image, network)
    assert out.shape == (1, 1, 150, 150)
    peaks = torch.cat(seen)
    assert len(peaks) > 4 and (peaks[:, 1] > 0).all()  # every window has a background click
    # Windows over a nucleus get a positive click, the blank ones none (SAM's padding point).
    assert 2 <= int((peaks[:, 0] > 0).sum()) < len(peaks)


def test_glass_windows_are_skipped_and_stained_ones_unchanged():
    """With min_stain_density, the network runs only on windows holding stain; the stained part's logits
    are those of running every window wherever no glass window overlaps."""
    class CountingSPPNet(SPPNet):
        windows = 0

        def forward(self, image):
            self.windows += image.shape[0]
            return super().forward(image)

    torch.manual_seed(0)
    net = CountingSPPNet(image_size=64).eval()
    rgb = torch.full((3, 64, 256), 245.0)  # glass (optical density ~0.02)
    rgb[:, :, :64] = torch.tensor([150.0, 90.0, 170.0])[:, None, None]  # stained tissue in the first window only
    rgb[:, 20:30, 20:30] = 60.0
    rgb[:, 10:14, 200:203] = 60.0  # 12 stained pixels of dust on the glass: its window runs
    image = torch.zeros(1, 5, 64, 256)
    image[0, :3] = (rgb - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    kwargs = dict(roi_size=(64, 64), overlap=0.0, mode="constant")
    with torch.no_grad():
        every = PromptedSlidingWindowInferer(**kwargs)(image, net)
        assert net.windows == 4
        net.windows = 0
        skipping = PromptedSlidingWindowInferer(min_stain_density=0.15, min_stain_pixels=10, **kwargs)(image, net)
    assert net.windows == 2  # the tissue window and the dusty one
    torch.testing.assert_close(skipping[..., :64], every[..., :64])
    torch.testing.assert_close(skipping[..., 192:], every[..., 192:])
    assert (skipping[..., 64:192] == GLASS_LOGIT).all() and not torch.equal(every[..., 64:192], skipping[..., 64:192])
    with torch.no_grad():  # a small image of glass alone: no network run at all
        blank = PromptedSlidingWindowInferer(min_stain_density=0.15, **kwargs)(image[..., 64:128], net)
    assert net.windows == 2 and blank.shape == (1, 1, 64, 64) and (blank == GLASS_LOGIT).all()
    with pytest.raises(SPPNetError, match="min_stain_density must be a positive optical density or None, got '0.15'"):
        PromptedSlidingWindowInferer(min_stain_density="0.15", **kwargs)
    with pytest.raises(SPPNetError, match="min_stain_pixels must be a positive number of pixels, got 0"):
        PromptedSlidingWindowInferer(min_stain_density=0.15, min_stain_pixels=0, **kwargs)


def test_predict_cli_writes_masks_and_instances(checkpoint, images, tmp_path):
    clicks = tmp_path / "clicks.csv"
    first = sorted(images.iterdir())[0].name
    clicks.write_text(f"image,x,y,label\n{first},30,20,1\n{first},2,2,0\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "predict", str(images), str(out), "--checkpoint", str(checkpoint),
         "--clicks", str(clicks), "--formats", "png,nii"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert len(summary["images"]) == 3 and not summary["failed"]
    mask = np.asarray(Image.open(out / f"{Path(first).stem}_mask.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    expected_mask, expected_instances = Predictor(str(checkpoint)).predict(
        {"image": str(images / first), "foreground": [[30.0, 20.0]], "background": [[2.0, 2.0]]}
    )
    np.testing.assert_array_equal(mask > 0, expected_mask)
    instances = np.asarray(Image.open(out / f"{Path(first).stem}_instances.png"))
    np.testing.assert_array_equal(instances, expected_instances)
    assert summary["images"][str(images / first)]["nuclei"] == int(expected_instances.max())
    import nibabel as nib

    nifti = nib.load(str(out / f"{Path(first).stem}_mask.nii.gz")).get_fdata()
    np.testing.assert_array_equal(nifti.T, mask)
    assert not list(out.glob(".*tmp*"))  # no temporary files left


def test_large_image_is_tiled(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(big)
    summary = run_predict(str(big), str(tmp_path / "out"), checkpoint=str(checkpoint))
    mask = np.asarray(Image.open(tmp_path / "out" / "big_mask.png")) > 0
    predictor = Predictor(str(checkpoint))
    image = predictor.prepare({"image": str(big), "foreground": [], "background": []})
    windows = []
    with torch.no_grad(), predictor.autocast():  # the precision predict runs in (bfloat16 on a CPU with bf16 units)
        logits = predictor.inferer(image[None], lambda w: windows.append(w.shape) or predictor.network(w))[0].float()
    assert mask.shape == (150, 200) and len(windows) > 1 and all(shape[-2:] == (64, 64) for shape in windows)
    np.testing.assert_array_equal(mask, predictor.mask(logits))
    assert summary["images"][str(big)]["nuclei_fraction"] == round(float(mask.mean()), 4)


def test_bad_images_are_reported_and_others_processed(checkpoint, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(images.iterdir())[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    clicks = tmp_path / "clicks.json"
    name = sorted(images.iterdir())[1].name
    clicks.write_text(json.dumps({name: {"foreground": [[500, 3]], "background": []}}))
    summary = run_predict(str(folder), str(tmp_path / "out"), checkpoint=str(checkpoint), clicks=str(clicks))
    assert len(summary["images"]) == 1
    assert "broken.png" in " ".join(summary["failed"])
    assert any("outside" in message for message in summary["failed"].values())


def test_empty_folder_and_no_usable_image(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SPPNetError, match="no images"):
        run_predict(str(tmp_path / "empty"), str(tmp_path / "out"), checkpoint=str(checkpoint))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(SPPNetError, match=r"^cannot identify image file .*x\.png'$"):  # one image: its reason alone
        run_predict(str(tmp_path / "bad"), str(tmp_path / "out"), checkpoint=str(checkpoint))


def test_mismatched_checkpoint_is_one_line(tmp_path, images):
    from monai.networks.nets import BasicUNet

    unet = tmp_path / "unet.pt"
    torch.save(BasicUNet(spatial_dims=2, in_channels=5, out_channels=1).state_dict(), unet)
    result = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "predict", str(images), str(tmp_path / "out"), "--checkpoint", str(unet)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: checkpoint {unet} is not an SPPNet checkpoint (its keys look like unknown: {next(iter(torch.load(unet)))}, " + ", ".join(list(torch.load(unet))[1:3]) + ")."


def test_contradicting_image_size_is_one_line_from_the_command_line(checkpoint, images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "predict", str(images), str(tmp_path / "out"), "--checkpoint", str(checkpoint),
         "--image_size", "128"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {checkpoint} was trained with image_size 64 (this network: 128): leave these settings out "
        "to use the checkpoint's own, or give the same values."
    ]
    assert not (tmp_path / "out").exists()


def test_predictor_reads_the_bundle_config(checkpoint):
    predictor = Predictor(str(checkpoint), threshold=0.4)
    assert predictor.network.image_size == 64 and predictor.threshold == 0.4  # the size from the checkpoint's recipe


def test_evaluate_cli_reports_every_metric_and_prompt_spread(checkpoint, tmp_path):
    dataset = tmp_path / "data"
    prepare_demo(dataset, num_images=4, image_size=64, seed=2, val_fraction=0.5)
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "evaluate", str(dataset), "--checkpoint", str(checkpoint), "--output_dir", str(out),
         "--prompt_draws", "3", "--overlays"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice", "iou", "dice_256", "iou_256", "aji", "pq", "f1"):
        assert set(metrics[key]) == {"mean", "std", "per_image"} and len(metrics[key]["per_image"]) == 2
        assert 0.0 <= metrics[key]["mean"] <= 1.0
    assert metrics["prompt_draws"]["draws"] == 3 and len(metrics["prompt_draws"]["mean_dice_per_draw"]) == 3
    assert (out / "prompt_draws_violin.png").is_file() and len(list((out / "overlays").glob("*.png"))) == 2
    assert (out / "metrics.csv").read_text().splitlines()[0] == "image,instances,dice,iou,dice_256,iou_256,aji,pq,f1,clicked_dice"

"""The MONAI bundle, tested as the Model Zoo tests its bundles: workflows, export, logs, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.networks.nets import BasicUNet

from sppnet_monai.data.prepare import prepare_demo
from sppnet_monai.networks import SPPNet
from sppnet_monai.networks.checkpoints import load_checkpoint
from sppnet_monai.workflows.errors import BundleInputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "fast_cpu.json")]
TINY = {"image_size": 64, "batch_size": 2, "max_epochs": 2, "val_interval": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("demo")
    prepare_demo(dst, num_images=8, image_size=64, seed=0, val_fraction=0.25)  # 6 training, 2 validation
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A bundle root holding 2 epochs of training on the tiny demo (checkpoints and TensorBoard logs)."""
    root = tmp_path_factory.mktemp("bundle")
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(root), dataset_dir=str(dataset), **TINY,
    )
    workflow.initialize()
    assert workflow.check_properties() == [] or workflow.check_properties() is None
    workflow.run()
    workflow.finalize()
    return root


def _bundle_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", META, "--logging_file", LOGGING]


def test_train_workflow_writes_checkpoints(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert (trained / "models" / "checkpoint_epoch=2.pt").is_file()
    net = SPPNet(image_size=64)
    assert load_checkpoint(net, trained / "models" / "model.pt") == "sppnet"


def test_tensorboard_has_loss_metrics_lr_and_image(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "val_mean_dice", "val_mean_iou", "learning_rate"} <= scalars, scalars
    assert len(events.Scalars("val_mean_dice")) == 2
    images = events.Tags()["images"]
    assert images, "no image written to TensorBoard"
    assert events.Images(images[0])[0].width == 64


def test_evaluate_saves_per_image_metrics(trained, dataset):
    workflow = ConfigWorkflow(
        config_file=TRAIN + [str(CONFIGS / "evaluate.json")], meta_file=META, logging_file=LOGGING,
        workflow_type="eval", bundle_root=str(trained), dataset_dir=str(dataset), image_size=64,
    )
    workflow.initialize()
    workflow.run()
    raw = (trained / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert raw[0].startswith("filename") and len(raw) == 3  # two validation images
    assert (trained / "eval" / "val_mean_iou_raw.csv").is_file()


def test_inference_workflow_writes_masks(trained, dataset, tmp_path):
    clicks = tmp_path / "clicks.json"
    first = sorted((dataset / "images").glob("*.png"))[0]
    clicks.write_text(json.dumps({first.name: {"foreground": [[30, 20]], "background": [[1, 1]]}}))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING, workflow_type="infer",
        bundle_root=str(trained), input_dir=str(dataset / "images"), clicks_file=str(clicks),
        output_dir=str(tmp_path / "pred"), image_size=64,
    )
    workflow.initialize()
    assert workflow.check_properties() == [] or workflow.check_properties() is None
    workflow.run()
    masks = sorted((tmp_path / "pred").glob("*_seg.png"))
    assert len(masks) == 8
    from PIL import Image

    assert Image.open(masks[0]).size == (64, 64)


def test_verify_net_in_out_and_torchscript_export(trained, tmp_path):
    config = [str(CONFIGS / "inference.json")]
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=config, n=1, any=1)
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts_path), ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=META, config_file=config, use_trace=True, input_shape=[1, 5, 64, 64],
        args_file=None, image_size=64,
    )
    scripted = torch.jit.load(str(ts_path))
    eager = SPPNet(image_size=64).eval()
    load_checkpoint(eager, trained / "models" / "model.pt")
    image = torch.randn(1, 5, 64, 64).clamp(min=0)
    image[:, 3:] = 0
    image[0, 3, 10, 40] = image[0, 4, 60, 2] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), eager(image), atol=1e-4, rtol=1e-4)


def test_resume_after_kill(dataset, tmp_path):
    """Kill a run mid-training, rerun the same command: it resumes from the latest epoch and finishes."""
    cmd = _bundle_cmd(
        "training", "--config_file", json.dumps(TRAIN), "--bundle_root", str(tmp_path),
        "--dataset_dir", str(dataset), "--image_size", "64", "--batch_size", "1", "--max_epochs", "4",
    )
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "models" / "checkpoint_epoch=1.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # well into epoch 2
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert checkpoint.exists() or (tmp_path / "models" / "checkpoint_epoch=2.pt").exists()
    assert not (tmp_path / "models" / "checkpoint_epoch=4.pt").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resuming from" in second.stdout
    assert "Epoch: 1/4" not in second.stdout  # epoch 1 is not trained again
    assert (tmp_path / "models" / "checkpoint_epoch=4.pt").is_file()
    load_checkpoint(SPPNet(image_size=64), tmp_path / "models" / "model.pt")


def test_checkpoint_carries_validation_state_and_recipe(trained):
    """A resume restores the best-model saver and early stopping, and knows the recipe it came from."""
    state = torch.load(trained / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert state["best_model_saver"]["_saved"], "best-model list not saved"
    assert "counter" in state["early_stop"] and state["early_stop"]["best_score"] is not None
    assert state["recipe"]["image_size"] == "64"


def test_resume_refuses_another_recipe(capsys, trained, dataset, tmp_path):
    (tmp_path / "models").mkdir()
    for path in (trained / "models").glob("checkpoint_epoch=*.pt"):
        (tmp_path / "models" / path.name).write_bytes(path.read_bytes())
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(tmp_path), dataset_dir=str(dataset), fusion="concat", **TINY,
    )
    assert "another training recipe (fusion 'add' -> 'concat')" in _one_line_error(capsys, workflow)


def test_validation_clicks_are_redrawn_identically_each_run():
    """Every validation run sees the same clicks, so Dice changes only when the network does."""
    import numpy as np
    from ignite.engine import Engine
    from monai.transforms import Compose

    from sppnet_monai.transforms import CenterNeighborhoodPointSampled
    from sppnet_monai.workflows import ReseedRandomTransforms

    label = np.zeros((1, 32, 32), dtype=np.int32)
    label[0, 4:12, 4:12], label[0, 18:30, 16:28] = 1, 2
    sampler = Compose([CenterNeighborhoodPointSampled(label_key="label", sigma=3.0)])
    clicks: list = []
    engine = Engine(lambda e, batch: clicks.append(sampler({"label": label})["foreground"]))
    ReseedRandomTransforms(sampler, seed=1).attach(engine)
    engine.run(range(5), max_epochs=1)
    first = list(clicks)
    clicks.clear()
    engine.run(range(5), max_epochs=1)
    assert clicks == first and len({str(c) for c in first}) > 1  # same sequence, not a constant click


def test_torchrun_two_processes_on_cpu(dataset, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000),
        "-m", "monai.bundle", "run", "--config_file",
        json.dumps(TRAIN + [str(CONFIGS / "multi_gpu_train.json")]), "--meta_file", META, "--logging_file", LOGGING,
        "--bundle_root", str(tmp_path), "--dataset_dir", str(dataset), "--image_size", "64", "--batch_size", "1",
        "--max_epochs", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "models").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]


def _one_line_error(capsys, workflow: ConfigWorkflow) -> str:
    """Run ``workflow`` expecting a one-line user error; return that line."""
    with pytest.raises(BundleInputError):
        workflow.initialize()
        workflow.run()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _run_expecting_error(capsys, tmp_path, **override):
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(tmp_path), **{**TINY, **override},
    )
    message = _one_line_error(capsys, workflow)
    assert not (tmp_path / "models").exists()  # nothing trained
    return message


def test_missing_datalist(capsys, tmp_path):
    message = _run_expecting_error(capsys, tmp_path, dataset_dir=str(tmp_path / "nowhere"))
    assert "no datalist.json in dataset_dir" in message


def test_empty_datalist(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps({"training": [], "validation": []}))
    assert "has no 'training' entries" in _run_expecting_error(capsys, tmp_path, dataset_dir=str(data))


def test_datalist_entry_with_missing_file(capsys, tmp_path, dataset):
    content = json.loads((dataset / "datalist.json").read_text())
    content["training"][0]["image"] = "images/missing.png"
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("images", "labels"):
        (data / sub).symlink_to(dataset / sub)
    (data / "datalist.json").write_text(json.dumps(content))
    message = _run_expecting_error(capsys, tmp_path, dataset_dir=str(data))
    assert "missing.png does not exist" in message


def test_label_size_differs_from_image(capsys, tmp_path, dataset):
    import numpy as np
    from PIL import Image

    content = json.loads((dataset / "datalist.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("images", "labels"):
        (data / sub).symlink_to(dataset / sub)
    Image.fromarray(np.zeros((32, 48), dtype=np.uint16)).save(data / "small_label.png")
    content["training"][0]["label"] = "small_label.png"
    (data / "datalist.json").write_text(json.dumps(content))
    message = _run_expecting_error(capsys, tmp_path, dataset_dir=str(data))
    assert "small_label.png is 48x32 but image" in message and "is 64x64" in message


def test_inference_click_outside_image(capsys, trained, dataset, tmp_path):
    first = sorted((dataset / "images").glob("*.png"))[0]
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({first.name: {"foreground": [[500, 5]]}}))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING, workflow_type="infer",
        bundle_root=str(trained), input_dir=str(dataset / "images"), clicks_file=str(clicks),
        output_dir=str(tmp_path / "pred"), image_size=64,
    )
    assert f"foreground click [500, 5] is outside {first} (64x64" in _one_line_error(capsys, workflow)
    assert not (tmp_path / "pred").exists()


def test_checkpoint_of_another_architecture(capsys, tmp_path, dataset):
    unet = tmp_path / "unet.pt"
    torch.save(BasicUNet(spatial_dims=2, in_channels=5, out_channels=1).state_dict(), unet)
    message = _run_expecting_error(capsys, tmp_path, dataset_dir=str(dataset), mobilesam_checkpoint=str(unet))
    assert "unet.pt is not a mobile_sam checkpoint" in message


@pytest.mark.parametrize("image_size", [100, 32, "256"])
def test_image_size_the_network_cannot_take(capsys, tmp_path, dataset, image_size):
    message = _run_expecting_error(capsys, tmp_path, dataset_dir=str(dataset), image_size=image_size)
    assert message == f"error: image_size must be a multiple of 16 and at least 64, got {image_size!r}."


def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    result = subprocess.run(
        _bundle_cmd("training", "--config_file", json.dumps(TRAIN), "--bundle_root", str(tmp_path),
                    "--dataset_dir", str(tmp_path / "nowhere")),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no datalist.json")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc setting")
def test_reuse_freed_memory_stops_page_faults_on_large_tensors():
    import resource

    from sppnet_monai.workflows import reuse_freed_memory

    def page_faults_of_large_tensors() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            torch.ones(16 * 2**20)  # 64 MiB, over glibc's largest default mmap threshold (32 MiB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    if not reuse_freed_memory():
        pytest.skip("the C library is not glibc or refuses the setting")
    page_faults_of_large_tensors()  # grows the heap once
    pages = 3 * 64 * 2**20 // resource.getpagesize()
    assert page_faults_of_large_tensors() < pages // 100  # by default every block faults in afresh: ~all pages

"""The MONAI bundle, tested as the Model Zoo tests its bundles: workflows, export, logs, resume, bad input."""

from __future__ import annotations

import json
import os
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.networks.nets import BasicUNet
from monai.utils import BundleProperty

from sppnet_monai.data.prepare import prepare_demo
from sppnet_monai.networks import RECIPE_KEYS, SPPNet
from sppnet_monai.evaluate import run_evaluate
from sppnet_monai.networks.checkpoints import load_checkpoint, read_recipe, read_state_dict
from sppnet_monai.predict import Predictor
from sppnet_monai.utils import SPPNetError, user_error
from sppnet_monai.workflows import WeightAverage, parameter_groups

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "fast_cpu.json")]
TINY = {"image_size": 64, "batch_size": 2, "max_epochs": 2, "val_interval": 1}
SHIPPED = REPO / "bundle" / "weights" / "sppnet_monuseg.pt"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("demo")
    prepare_demo(dst, num_images=8, image_size=64, seed=0, val_fraction=0.25)  # 6 training, 2 validation
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A bundle root holding 2 epochs of training on the tiny demo (checkpoints and TensorBoard logs)."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "weights").mkdir()
    shutil.copy2(SHIPPED, root / "weights" / SHIPPED.name)  # as in the repository's bundle folder
    workflow = ConfigWorkflow(
        config_file=TRAIN + [str(CONFIGS / "demo.json")], meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(root), dataset_dir=str(dataset), **TINY,
    )
    workflow.initialize()
    _assert_complete(workflow)
    workflow.run()
    workflow.finalize()
    return root


def _assert_complete(workflow: ConfigWorkflow) -> None:
    """MONAI's property check passes, and every required property resolves to a value."""
    # With a workflow_type, ConfigWorkflow.check_properties returns the list of missing required
    # properties and optional ones with a wrong id (None only without a workflow_type).
    assert workflow.check_properties() == []
    required = [name for name, prop in workflow.properties.items() if prop.get(BundleProperty.REQUIRED, False)]
    assert {"bundle_root", "device", "dataset_dir"} <= set(required)
    for name in required:
        assert getattr(workflow, name) is not None, name


def _bundle_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", META, "--logging_file", LOGGING]


def test_train_workflow_writes_checkpoints(trained):
    assert (trained / "models" / "model.pt").is_file()
    # The README's demo run (train.json + fast_cpu.json + demo.json) leaves the shipped weights as they were.
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(trained / "weights" / SHIPPED.name) == digest(SHIPPED)
    assert (trained / "models" / "checkpoint_epoch=2.pt").is_file()
    net = SPPNet(image_size=64)
    assert load_checkpoint(net, trained / "models" / "model.pt") == "sppnet"


def test_cpu_recipe_trains_an_instance_head(dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_recipe.json")], meta_file=META, logging_file=LOGGING,
        workflow_type="train", bundle_root=str(tmp_path), dataset_dir=str(dataset),
        **{**TINY, "max_epochs": 1, "crops_per_image": 1, "zoom_prob": 1.0},  # its scale augmentation on every crop
    )
    workflow.initialize()
    zoom = next(t for t in workflow.parser.get_parsed_content("train#spatial_transforms") if type(t).__name__ == "RandZoomd")
    assert zoom.prob == 1.0 and (zoom.rand_zoom.min_zoom, zoom.rand_zoom.max_zoom) == ((0.8,), (1.25,))
    workflow.run()
    workflow.finalize()
    net = SPPNet(image_size=64, instance_head="distance")
    assert load_checkpoint(net, tmp_path / "models" / "model.pt") == "sppnet"
    with pytest.raises(ValueError, match="instance_head 'distance'"):  # the recipe says how to build the network
        load_checkpoint(SPPNet(image_size=64), tmp_path / "models" / "model.pt")
    assert net(torch.zeros(1, 5, 64, 64)).shape == (1, 2, 64, 64)


def _train_native_recipe(dataset: Path, root: Path, **overrides) -> None:
    """cpu_recipe.json + native_cpu.json (the shipped recipe), one tiny epoch, into the bundle root ``root``."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_recipe.json"), str(CONFIGS / "native_cpu.json")],
        meta_file=META, logging_file=LOGGING, workflow_type="train", bundle_root=str(root), dataset_dir=str(dataset),
        **{**TINY, "max_epochs": 1, "crops_per_image": 1, **overrides},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_shipped_recipe_trains_the_native_network_with_both_heads(dataset, tmp_path):
    """cpu_recipe.json + native_cpu.json (the native recipe), one tiny epoch: the recipe lands in the checkpoint."""
    _train_native_recipe(dataset, tmp_path)
    recipe = json.loads((CONFIGS / "native_cpu.json").read_text())
    net = SPPNet(image_size=64, **{key: recipe[key] for key in RECIPE_KEYS if key in recipe})
    assert net.recipe["mask_stride"] == 1 and net.instance_head == "distance" and net.click_head
    assert load_checkpoint(net, tmp_path / "models" / "model.pt") == "sppnet"
    assert net(torch.zeros(1, 5, 64, 64)).shape == (1, 3, 64, 64)


def test_native_recipe_trains_the_hover_head_and_inference_splits_nuclei_with_it(dataset, tmp_path):
    """``instance_head hv`` (HoVer-Net's maps, two spare tokens) through training, the Predictor and evaluate."""
    _train_native_recipe(dataset, tmp_path, instance_head="hv")
    checkpoint = tmp_path / "models" / "model.pt"
    assert read_recipe(checkpoint)["instance_head"] == "hv"
    predictor = Predictor(str(checkpoint))
    entry = json.loads((dataset / "datalist.json").read_text())["validation"][0]
    logits = predictor.logits(predictor.prepare({"image": str(dataset / entry["image"]), "foreground": [], "background": []}))
    assert logits.shape[0] == 4 and predictor.clicked_channel == 3  # mask, horizontal, vertical, clicked nucleus
    head = predictor.head_map(logits)
    assert head.shape == (2, *logits.shape[-2:]) and 0 <= head.min() and head.max() <= 1
    mask = np.zeros(logits.shape[-2:], dtype=bool)
    mask[10:30, 10:40] = True
    instances = predictor.split_nuclei(mask, head)
    assert instances.max() >= 1 and ((instances > 0) & mask).sum() >= mask.sum() - 30  # most of the mask kept (min_size)
    assert not (instances[~mask]).any()  # nothing outside it
    scores = run_evaluate(str(dataset), str(tmp_path / "evaluate"), str(checkpoint), protocol="automatic")
    assert 0 <= scores["aji"]["mean"] <= 1


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
        checkpoint=str(trained / "models" / "model.pt"),
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
        output_dir=str(tmp_path / "pred"), image_size=64, checkpoint=str(trained / "models" / "model.pt"),
    )
    workflow.initialize()
    _assert_complete(workflow)
    workflow.run()
    masks = sorted((tmp_path / "pred").glob("*_seg.png"))
    assert len(masks) == 8
    from PIL import Image

    assert Image.open(masks[0]).size == (64, 64)


def test_verify_net_in_out_and_torchscript_export(trained, tmp_path):
    config = [str(CONFIGS / "inference.json")]
    # metadata.json's network_data_format describes the shipped model: its window, its 3 output channels
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=config, n=1, any=1, bundle_root=str(REPO / "bundle"))
    with pytest.raises(ValueError, match="output channel number `1` doesn't match: `3`"):
        verify_net_in_out(net_id="network_def", meta_file=META, config_file=config, n=1, any=1, image_size=256, bundle_root=str(trained),
                          checkpoint=str(trained / "models" / "model.pt"))  # the demo's network: the mask alone
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts_path), ckpt_file=str(trained / "models" / "model.pt"),
        meta_file=META, config_file=config, use_trace=True, input_shape=[1, 5, 64, 64],
        args_file=None, bundle_root=str(trained), checkpoint=str(trained / "models" / "model.pt"),
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
    """Kill a run mid-training, rerun the same command: it resumes from the latest epoch and finishes.

    The kill comes from inside the first run at a known point (the first iteration of epoch 2, after
    epoch 1's checkpoint was written), as abruptly as SIGKILL (``os._exit``: no handler, no cleanup).
    """
    train_config = json.loads((CONFIGS / "train.json").read_text())
    kill = tmp_path / "kill_in_epoch_2.json"
    kill.write_text(json.dumps({
        "imports": train_config["imports"] + ["$import os", "$from ignite.engine import Events"],
        "run": [
            "$@validate#early_stop.set_trainer(trainer=@train#trainer)",
            "$@train#trainer.add_event_handler(Events.ITERATION_COMPLETED, "
            "lambda engine: engine.state.epoch == 2 and os._exit(137))",
            "$@train#trainer.run()",
        ],
    }))
    root = tmp_path / "bundle"
    args = ("--bundle_root", str(root), "--dataset_dir", str(dataset), "--image_size", "64", "--batch_size", "1",
            "--max_epochs", "4")
    first = subprocess.run(_bundle_cmd("training", "--config_file", json.dumps(TRAIN + [str(kill)]), *args),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 137, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Epoch: 2/4" in first.stdout + first.stderr  # killed inside epoch 2, not before it
    assert sorted(p.name for p in (root / "models").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    second = subprocess.run(_bundle_cmd("training", "--config_file", json.dumps(TRAIN), *args),
                            capture_output=True, text=True, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resuming from" in output and "checkpoint_epoch=1.pt" in output
    assert "Epoch: 1/4" not in output  # epoch 1 is not trained again
    assert "Epoch: 2/4" in output  # the killed epoch is trained again from its start
    assert (root / "models" / "checkpoint_epoch=4.pt").is_file()
    load_checkpoint(SPPNet(image_size=64), root / "models" / "model.pt")


def test_checkpoint_carries_validation_state_and_recipe(trained):
    """A resume restores the best-model saver and early stopping, and knows the recipe it came from."""
    state = torch.load(trained / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert state["best_model_saver"]["_saved"], "best-model list not saved"
    assert "counter" in state["early_stop"] and state["early_stop"]["best_score"] is not None
    assert state["recipe"]["image_size"] == "64"


def _resume_with(trained: Path, dataset: Path, root: Path, **settings) -> ConfigWorkflow:
    """A training workflow in ``root`` holding ``trained``'s checkpoints, run with other ``settings``."""
    (root / "models").mkdir()
    for path in (trained / "models").glob("checkpoint_epoch=*.pt"):
        (root / "models" / path.name).write_bytes(path.read_bytes())
    return ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(root), dataset_dir=str(dataset), **settings, **TINY,
    )


def test_resume_refuses_another_recipe(trained, dataset, tmp_path):
    workflow = _resume_with(trained, dataset, tmp_path, fusion="concat")
    assert "another training recipe (fusion 'add' -> 'concat')" in _one_line_error(workflow)


def test_resume_refuses_another_transformer_learning_rate(trained, dataset, tmp_path):
    """The optimizer's parameter groups change with transformer_lr_factor: a resume with another is refused in one line."""
    workflow = _resume_with(trained, dataset, tmp_path, transformer_lr_factor=0.5)
    assert "transformer_lr_factor '1.0' -> '0.5'" in _one_line_error(workflow)


def test_transformers_train_at_their_own_learning_rate():
    """train.json's optimizer: Tiny-ViT and SAM's two-way transformer at learning_rate * transformer_lr_factor, the
    rest at learning_rate, each decayed by the cosine schedule; factor 1 keeps one group of every parameter."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "cpu_recipe.json")])
    parser.update({"image_size": 64, "transformer_lr_factor": 0.2, "max_epochs": 4})
    optimizer = parser.get_parsed_content("optimizer")
    network = parser.get_parsed_content("network")
    rest, transformers = optimizer.param_groups
    assert rest["lr"] == pytest.approx(5e-4) and transformers["lr"] == pytest.approx(1e-4)
    by_id = {id(param): name for name, param in network.named_parameters()}
    names = [by_id[id(param)] for param in transformers["params"]]
    assert any(name.startswith("image_encoder.") for name in names) and any(name.startswith("mask_decoder.transformer.") for name in names)
    assert all(name.startswith(("image_encoder.", "mask_decoder.transformer.")) for name in names)
    assert len(rest["params"]) + len(names) == len(by_id)
    scheduler = parser.get_parsed_content("lr_scheduler")
    optimizer.step()
    scheduler.step()
    assert transformers["lr"] / rest["lr"] == pytest.approx(0.2, rel=0.05)  # (eta_min bends the ratio a little)

    single = parameter_groups(network, 5e-4, 1.0)
    assert len(single) == 1 and [id(p) for p in single[0]["params"]] == [id(p) for p in network.parameters()]
    assert len(parameter_groups(BasicUNet(spatial_dims=2, in_channels=5, out_channels=1), 5e-4, 0.2)) == 1
    with pytest.raises(SPPNetError, match="transformer_lr_factor must be above 0, got 0"):
        parameter_groups(network, 5e-4, 0)


@pytest.mark.parametrize("missing, settings, refusal", [
    ("residual_units", {"mask_stride": 1, "residual_units": 2}, "residual_units '0' -> '2'"),
    ("transformer_lr_factor", {"transformer_lr_factor": 0.5}, "transformer_lr_factor '1.0' -> '0.5'"),
    ("ema_decay", {"ema_decay": 0.9}, "ema_decay '0.0' -> '0.9'"),
])
def test_resume_of_a_run_saved_before_a_setting_existed(trained, dataset, tmp_path, missing, settings, refusal):
    """A run saved before a setting existed had its default: resuming it with another value is another recipe, said in one line."""
    (tmp_path / "models").mkdir()
    for path in (trained / "models").glob("checkpoint_epoch=*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        state["recipe"].pop(missing)
        torch.save(state, tmp_path / "models" / path.name)
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(tmp_path), dataset_dir=str(dataset), **settings, **TINY,
    )
    assert refusal in _one_line_error(workflow)


def test_weight_average_follows_each_step_after_its_warm_up():
    """The average copies the first step, then moves (1 - decay) of the way to each new weight; decay 0 is off."""
    from ignite.engine import Engine

    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    average = WeightAverage(network, decay=0.5, warmup_power=1.0)

    def step(engine, batch):
        with torch.no_grad():
            network.weight += 1.0  # an optimizer step: the weight goes 1, 2, 3

    engine = Engine(step)
    average.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    # step 1 copies (1); step 2: 0.5 * 1 + 0.5 * 2 = 1.5; step 3: 0.5 * 1.5 + 0.5 * 3 = 2.25
    assert average.network.weight.item() == pytest.approx(2.25)
    assert network.weight.item() == pytest.approx(3.0) and average.network is not network

    off = WeightAverage(network, decay=0.0)
    assert off.network is network and off.average is None
    with pytest.raises(SPPNetError, match="ema_decay 1.0: must be in"):
        WeightAverage(network, decay=1.0)


def test_training_with_a_weight_average_validates_saves_and_resumes_it(dataset, tmp_path):
    """ema_decay > 0: validation scores the average, model.pt and the epoch checkpoints hold it, a resume restores it."""
    def workflow(max_epochs: int) -> ConfigWorkflow:
        return ConfigWorkflow(
            config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
            bundle_root=str(tmp_path), dataset_dir=str(dataset), ema_decay=0.9, **{**TINY, "max_epochs": max_epochs},
        )

    first = workflow(2)
    first.initialize()
    average = first.parser.get_parsed_content("weight_average")
    assert first.parser.get_parsed_content("validate#evaluator").network is average.network is not first.parser.get_parsed_content("network")
    first.run()
    first.finalize()
    state = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert state["recipe"]["ema_decay"] == "0.9"
    averaged = {key[len("module."):]: value for key, value in state["weight_average"].items()}
    trained_weights = state["network"]
    moved = [key for key, value in trained_weights.items() if torch.is_tensor(value) and not torch.equal(value, averaged[key])]
    assert moved, "the average is the training network itself"
    # A training checkpoint is read through its average, as released and as model.pt holds it.
    read = read_state_dict(tmp_path / "models" / "checkpoint_epoch=2.pt")
    assert all(torch.equal(read[key], averaged[key]) for key in moved)
    load_checkpoint(SPPNet(image_size=64), tmp_path / "models" / "model.pt")

    from ignite.engine import Events

    second = workflow(3)
    second.initialize()
    restored = {}
    # After the resume's CheckpointLoader (attached when the trainer was built), before any step of epoch 3.
    second.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.STARTED, lambda engine: restored.update(
            {key: value.clone() for key, value in second.parser.get_parsed_content("weight_average").network.named_parameters()}))
    second.run()
    second.finalize()
    assert all(torch.equal(restored[key], averaged[key]) for key in moved)
    assert (tmp_path / "models" / "checkpoint_epoch=3.pt").is_file()


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


@pytest.mark.parametrize("rank", [0, 1])
def test_multi_gpu_handlers_of_each_rank(monkeypatch, dataset, tmp_path, rank):
    """Rank 0 keeps every handler; the others keep what must run on every rank, click reseeding included."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: rank)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.update({
        "bundle_root": str(tmp_path), "dataset_dir": str(dataset), "image_size": 64,
        # no process group here: a plain network and loader stand in for DistributedDataParallel and its sampler
        "device": "$torch.device('cpu')", "network": "$torch.nn.Linear(1, 1)", "validate#sampler": None,
    })
    try:
        val_handlers = parser.get_parsed_content("validate#evaluator#val_handlers")
        train_handlers = parser.get_parsed_content("train#trainer#train_handlers")
    finally:
        parser.get_parsed_content("summary_writer").close()
    val_names = [type(h).__name__ for h in val_handlers]
    train_names = [type(h).__name__ for h in train_handlers]
    if rank == 0:
        assert val_names == ["ReseedRandomTransforms", "StatsHandler", "TensorBoardStatsHandler",
                             "PromptOverlayTensorBoardHandler", "CheckpointSaver", "EarlyStopHandler"]
        assert train_names == ["LrScheduleHandler", "WeightAverage", "ValidationHandler", "StatsHandler", "TensorBoardStatsHandler",
                               "LearningRateTensorBoardHandler", "ResumableTrainingState"]
    else:
        assert val_names == ["ReseedRandomTransforms", "EarlyStopHandler"]
        assert train_names == ["LrScheduleHandler", "WeightAverage", "ValidationHandler", "ResumableTrainingState"]
    assert train_handlers[-1].save == (rank == 0)  # only rank 0 writes checkpoints
    # every rank reseeds the very transform its validation loader draws clicks with
    assert val_handlers[0].transform is parser.get_parsed_content("validate#dataset").transform


def test_configs_address_handlers_by_id():
    """Handlers are referred to by config id, never by their position in a list."""
    for path in sorted(CONFIGS.glob("*.json")):
        text = path.read_text()
        assert not re.search(r"handlers#\d|handlers\[", text), path.name
        json.loads(text)


def test_dataset_resolution_writes_nothing_initialize_generates_the_demo(tmp_path):
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train", bundle_root=str(tmp_path),
        dataset_dir="", demo_num_images=4, demo_image_size=64, image_size=64,
    )
    demo = tmp_path / "data" / "demo"
    with pytest.raises(Exception) as excinfo:
        workflow.parser.get_parsed_content("dataset")
    assert "no dataset_dir given and no datalist.json in demo_dir" in str(user_error(excinfo.value))
    assert not demo.exists()
    workflow.initialize()
    assert (demo / "datalist.json").is_file()
    assert workflow.parser.get_parsed_content("dataset") == str(demo)
    assert len(workflow.parser.get_parsed_content("train#datalist")) >= 1


def _one_line_error(workflow: ConfigWorkflow) -> str:
    """Run ``workflow`` in-process expecting a user error; return the line the bundle's command would print.

    In-process the error propagates (MONAI wraps it in RuntimeError); ``python -m monai.bundle run``
    prints it as this one line (see test_bad_input_is_one_line_from_the_command_line).
    """
    with pytest.raises(Exception) as excinfo:
        workflow.initialize()
        workflow.run()
    err = user_error(excinfo.value)
    assert err is not None, f"not a user error: {excinfo.value!r}"
    return f"error: {err}"


def _run_expecting_error(tmp_path, **override):
    workflow = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, logging_file=LOGGING, workflow_type="train",
        bundle_root=str(tmp_path), **{**TINY, **override},
    )
    message = _one_line_error(workflow)
    assert not (tmp_path / "models").exists()  # nothing trained
    return message


def test_missing_datalist(tmp_path):
    message = _run_expecting_error(tmp_path, dataset_dir=str(tmp_path / "nowhere"))
    assert "no datalist.json in dataset_dir" in message


def test_empty_datalist(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "datalist.json").write_text(json.dumps({"training": [], "validation": []}))
    assert "has no 'training' entries" in _run_expecting_error(tmp_path, dataset_dir=str(data))


def test_datalist_entry_with_missing_file(tmp_path, dataset):
    content = json.loads((dataset / "datalist.json").read_text())
    content["training"][0]["image"] = "images/missing.png"
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("images", "labels"):
        (data / sub).symlink_to(dataset / sub)
    (data / "datalist.json").write_text(json.dumps(content))
    message = _run_expecting_error(tmp_path, dataset_dir=str(data))
    assert "missing.png does not exist" in message


def test_label_size_differs_from_image(tmp_path, dataset):
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
    message = _run_expecting_error(tmp_path, dataset_dir=str(data))
    assert "small_label.png is 48x32 but image" in message and "is 64x64" in message


def test_inference_click_outside_image(trained, dataset, tmp_path):
    first = sorted((dataset / "images").glob("*.png"))[0]
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({first.name: {"foreground": [[500, 5]]}}))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=META, logging_file=LOGGING, workflow_type="infer",
        bundle_root=str(trained), input_dir=str(dataset / "images"), clicks_file=str(clicks),
        output_dir=str(tmp_path / "pred"), image_size=64, checkpoint=str(trained / "models" / "model.pt"),
    )
    assert f"foreground click [500, 5] is outside {first} (64x64" in _one_line_error(workflow)
    assert not (tmp_path / "pred").exists()


def test_checkpoint_of_another_architecture(tmp_path, dataset):
    unet = tmp_path / "unet.pt"
    torch.save(BasicUNet(spatial_dims=2, in_channels=5, out_channels=1).state_dict(), unet)
    message = _run_expecting_error(tmp_path, dataset_dir=str(dataset), mobilesam_checkpoint=str(unet))
    assert "unet.pt is not a mobile_sam checkpoint" in message


@pytest.mark.parametrize("image_size", [100, 32, "256"])
def test_image_size_the_network_cannot_take(tmp_path, dataset, image_size):
    message = _run_expecting_error(tmp_path, dataset_dir=str(dataset), image_size=image_size)
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
    # By default every block faults in afresh: ~all pages. The fewest of three tries, since the count is the whole
    # process's and another thread (a data loader's, left by an earlier test) may fault at the same time.
    assert min(page_faults_of_large_tensors() for _ in range(3)) < pages // 100

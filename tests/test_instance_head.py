"""The instance head: targets, loss, network output, watershed, recipe, release files and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from sppnet_monai.data.prepare import prepare_demo
from sppnet_monai.evaluate import run_evaluate, tune_postprocess, window_grid
from sppnet_monai.losses import MaskInstanceLoss, hover_map_loss
from sppnet_monai.networks import INSTANCE_CHANNEL, MASK_CHANNEL, SPPNet, clicked_channel
from sppnet_monai.networks.checkpoints import load_checkpoint, read_recipe, read_release, save_release
from sppnet_monai.postprocess import hover_edges, instances_from_head, instances_from_semantic
from sppnet_monai.predict import DEFAULT_CONFIG, Predictor
from sppnet_monai.transforms import NucleiInstanceTarget, NucleiInstanceTargetd, RandHEDJitterd, hover_maps
from sppnet_monai.utils import SPPNetError
from sppnet_monai.workflows.datasets import datalist_split

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "bundle" / "weights" / "sppnet_monuseg.pt"


def touching_nuclei() -> np.ndarray:
    """Two 10x8 nuclei side by side, touching along a column: one blob in a binary mask."""
    labels = np.zeros((16, 24), dtype=np.int32)
    labels[3:13, 3:11] = 1
    labels[3:13, 11:19] = 2
    return labels


@pytest.mark.parametrize("kind", ["boundary", "distance"])
def test_instance_target_separates_touching_nuclei(kind):
    targets = NucleiInstanceTarget(kind)(touching_nuclei()[None])
    assert targets.shape == (3, 16, 24)
    nuclei, instance_map, weight = targets
    np.testing.assert_array_equal(nuclei, touching_nuclei() > 0)
    assert not instance_map[touching_nuclei() == 0].any() and (weight == 1).all()
    cores = (nuclei > 0) & ((instance_map == 0) if kind == "boundary" else (instance_map > 0.5))
    from scipy import ndimage

    assert ndimage.label(cores)[1] == 2  # one core per nucleus, though the mask is one blob
    if kind == "boundary":
        assert instance_map[4:12, 10:12].all(), "the line where the nuclei touch is boundary, from both sides"
    else:
        assert instance_map.max() == 1.0 and (instance_map[4:12, 10:12] < 0.3).all(), "a valley where they touch"


def test_hover_maps_run_from_minus_one_to_one_across_each_nucleus_and_jump_where_two_touch():
    targets = NucleiInstanceTarget("hv")(touching_nuclei()[None], click=(5, 6), clicked=True)
    assert targets.shape == (5, 16, 24)  # nuclei, horizontal, vertical, weight, clicked nucleus
    horizontal, vertical = 2 * targets[1:3] - 1
    outside = touching_nuclei() == 0
    assert (horizontal[outside] == 0).all() and (vertical[outside] == 0).all()
    row = horizontal[8, 3:19]
    np.testing.assert_allclose(row[[0, 7, 8, 15]], [-1, 1, -1, 1])  # each nucleus left to right, a jump of 2 between
    assert (np.diff(row[:8]) > 0).all() and (np.diff(row[8:]) > 0).all()
    np.testing.assert_allclose(vertical[[3, 12], 6], [-1, 1])
    np.testing.assert_array_equal(targets[4], touching_nuclei() == 1)  # the click is on the left nucleus
    edges = hover_edges(targets[1:3])
    assert edges[4:12, 10:12].min() > 0.5 and edges[5:11, 4:9].max() == 0, "an edge where they touch, none inside"


def test_hover_maps_treat_each_piece_of_a_mirrored_nucleus_as_a_nucleus():
    labels = np.zeros((12, 30), dtype=np.int32)
    labels[3:9, 2:8] = labels[3:9, 22:28] = 1  # one id in two pieces, as reflection padding leaves a border nucleus
    horizontal = hover_maps(labels)[0]
    for piece in (np.s_[5, 2:8], np.s_[5, 22:28]):
        assert horizontal[piece][0] == -1 and horizontal[piece][-1] == 1  # each piece runs from -1 to +1


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
def test_flip_averaging_flips_the_sign_of_hover_maps_back(dims):
    """What a network predicts for a flipped image, flipped back by the Predictor, is what it predicts for the image."""
    from types import SimpleNamespace

    labels = np.zeros((16, 24), dtype=np.int32)
    labels[2:9, 3:10], labels[7:14, 11:21] = 1, 2
    as_logits = lambda ids: torch.logit(torch.as_tensor(NucleiInstanceTarget("hv")(ids[None])[:3]).clamp(0.01, 0.99))[None]  # noqa: E731
    flipped = np.ascontiguousarray(np.flip(labels, tuple(d + 2 for d in dims)))
    predictor = SimpleNamespace(instance_head="hv", _flip=Predictor._flip)
    torch.testing.assert_close(Predictor._unflip(predictor, as_logits(flipped), dims), as_logits(labels))


def test_instance_target_is_ignored_where_nuclei_come_from_a_binary_mask():
    d = NucleiInstanceTargetd("label")({"label": touching_nuclei()[None], "instances": "connected_components"})
    assert (d["label"][2] == 0).all()
    d = NucleiInstanceTargetd("label")({"label": torch.as_tensor(touching_nuclei()[None]), "instances": "xml"})
    assert isinstance(d["label"], torch.Tensor) and (d["label"][2] == 1).all()
    with pytest.raises(ValueError, match="kind"):
        NucleiInstanceTarget("contour")


def test_hover_loss_is_zero_for_the_target_and_learns_only_where_instances_are_known():
    target = torch.as_tensor(np.stack([NucleiInstanceTarget("hv")(touching_nuclei()[None], click=(5, 6), clicked=True)] * 2))
    target[1, 3] = 0  # the second sample's instances are unknown
    loss = MaskInstanceLoss("dice_ce", clicked_channel=clicked_channel("hv", True), instance_head="hv")
    exact = torch.logit(target[:, 1:3].clamp(1e-6, 1 - 1e-6))
    assert hover_map_loss(exact, target[:, 1:3], target[:, 3:4], target[:, :1]) < 1e-6
    pred = torch.randn(2, 4, 16, 24, requires_grad=True)
    loss(pred, target).backward()
    assert pred.grad[0, 1:3].abs().sum() > 0 and pred.grad[1, 1:3].abs().sum() == 0
    assert pred.grad[1, 0].abs().sum() > 0 and pred.grad[1, 3].abs().sum() > 0  # mask and click head: every image
    with pytest.raises(ValueError, match="instance head 'hv'"):
        loss(pred[:, :3], target)
    with pytest.raises(ValueError, match="instance_head must say"):
        MaskInstanceLoss("dice_ce", clicked_channel=3)(pred, target)


def test_loss_learns_the_instance_map_only_where_it_is_known():
    loss = MaskInstanceLoss("dice_ce")
    target = torch.as_tensor(np.stack([NucleiInstanceTarget()(touching_nuclei()[None])] * 2))
    target[1, 2] = 0  # the second sample's instances are unknown
    pred = torch.randn(2, 2, 16, 24, requires_grad=True)
    loss(pred, target).backward()
    assert pred.grad[0, 1].abs().sum() > 0 and pred.grad[1, 1].abs().sum() == 0
    assert pred.grad[1, 0].abs().sum() > 0  # the mask is learnt from every image
    single = torch.randn(2, 1, 16, 24)
    assert torch.isclose(MaskInstanceLoss("dice")(single, target[:, :1]), MaskInstanceLoss("dice")(single, target))
    with pytest.raises(ValueError, match="mask_loss"):
        MaskInstanceLoss("focal")


@pytest.mark.parametrize("kind", ["boundary", "distance", "hv"])
def test_watershed_on_the_head_map_separates_what_the_distance_watershed_merges(kind):
    labels = np.zeros((20, 40), dtype=np.int32)
    labels[4:16, 4:20] = 1  # two 12x16 rectangles sharing an edge: no neck for the distance transform
    labels[4:16, 20:36] = 2
    head = NucleiInstanceTarget(kind)(labels[None])[1:-1]  # between the nuclei and the weight
    head = head[0] if len(head) == 1 else head
    from sppnet_monai.metrics import aggregated_jaccard_index

    assert instances_from_semantic(labels > 0).max() == 1
    split = instances_from_head(labels > 0, head, kind)
    assert split.max() == 2 and aggregated_jaccard_index(split, labels) == 1.0
    assert instances_from_head(np.zeros((8, 8)), np.zeros(head.shape[:-2] + (8, 8)), kind).max() == 0
    with pytest.raises(SPPNetError, match="instance maps of shape"):
        instances_from_head(labels > 0, head[..., :5, :], kind)


def test_network_with_instance_head_outputs_two_channels_and_loads_old_checkpoints(tmp_path):
    torch.manual_seed(0)
    net = SPPNet(image_size=64, instance_head="distance").eval()
    image = torch.zeros(2, 5, 64, 64)
    image[:, 3, 30, 30] = 1.0
    out = net(image)
    assert out.shape == (2, 2, 64, 64) and (MASK_CHANNEL, INSTANCE_CHANNEL) == (0, 1)
    plain = SPPNet(image_size=64).eval()
    plain.load_state_dict(net.state_dict(), strict=False)
    torch.testing.assert_close(plain(image), out[:, :1])  # the mask channel is the plain network's output
    # A checkpoint of a network without the head, saved before recipes existed (no _extra_state), loads into one with it.
    old = {k: v for k, v in plain.state_dict().items() if k != "_extra_state"}
    torch.save(old, tmp_path / "old.pt")
    fresh = SPPNet(image_size=64, instance_head="distance")
    assert load_checkpoint(fresh, tmp_path / "old.pt") == "sppnet"
    torch.save(net.state_dict(), tmp_path / "new.pt")
    assert read_recipe(tmp_path / "new.pt")["instance_head"] == "distance"
    with pytest.raises(ValueError, match="multimask_output"):
        SPPNet(image_size=64, instance_head="distance", multimask_output=True)


def test_release_file_is_float16_with_recipe_and_provenance(tmp_path):
    torch.manual_seed(1)
    net = SPPNet(image_size=64, instance_head="distance").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    release = save_release(tmp_path / "model.pt", tmp_path / "release.pt", {"command": "train it", "license": "CC BY-NC-SA 4.0"})
    assert release == read_release(tmp_path / "release.pt") and release["command"] == "train it"
    assert read_recipe(tmp_path / "release.pt")["instance_head"] == "distance"
    state = torch.load(tmp_path / "release.pt", weights_only=True)
    assert {v.dtype for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()} == {torch.float16}
    assert (tmp_path / "release.pt").stat().st_size < 0.55 * (tmp_path / "model.pt").stat().st_size
    loaded = SPPNet(image_size=64, instance_head="distance").eval()
    load_checkpoint(loaded, tmp_path / "release.pt")
    image = torch.rand(1, 5, 64, 64)
    image[:, 3:] = 0
    image[0, 3, 20, 20] = 1
    torch.testing.assert_close(loaded(image), net(image), atol=0.05, rtol=0.0)  # float16 storage, float32 compute
    with pytest.raises(SPPNetError, match="records no recipe"):
        torch.save({k: v for k, v in net.state_dict().items() if k != "_extra_state"}, tmp_path / "old.pt")
        save_release(tmp_path / "old.pt", tmp_path / "never.pt", {})
    assert not (tmp_path / "never.pt").exists()


def test_hed_jitter_keeps_the_image_without_jitter_and_changes_it_with():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(60, 250, (3, 16, 16)).astype(np.float32)
    same = RandHEDJitterd("image", scale=0.0, shift=0.0, prob=1.0)({"image": rgb})["image"]
    np.testing.assert_allclose(same, rgb, atol=1e-3)
    jitter = RandHEDJitterd("image", scale=0.2, shift=0.05, prob=1.0).set_random_state(3)
    changed = jitter({"image": rgb})["image"]
    assert changed.dtype == np.float32 and np.abs(changed - rgb).mean() > 1 and 0 <= changed.min() and changed.max() <= 255
    again = RandHEDJitterd("image", scale=0.2, shift=0.05, prob=1.0).set_random_state(3)({"image": rgb})["image"]
    np.testing.assert_array_equal(again, changed)
    assert RandHEDJitterd("image", prob=0.0)({"image": rgb})["image"] is rgb


@pytest.mark.parametrize("shape", [(1000, 1000), (300, 280), (64, 64)])
def test_prompted_protocol_windows_are_the_inferers_windows(shape):
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    coordinates = torch.stack([rows, cols]).float()[None]  # each pixel holds its own position
    visited = []

    def record(window):
        visited.extend((int(w[0, 0, 0]), int(w[1, 0, 0])) for w in window)
        return window[:, :1]

    SlidingWindowInferer((256, 256), sw_batch_size=4, overlap=0.25)(coordinates, record)
    windows = window_grid(shape, (256, 256), 0.25)
    assert sorted((r.start, c.start) for r, c in windows) == sorted(visited)
    assert all(r.stop - r.start == min(256, shape[0]) and c.stop - c.start == min(256, shape[1]) for r, c in windows)


def test_tune_postprocess_scores_what_evaluate_scores(tmp_path):
    """Each row of the post-processing search is what ``evaluate --protocol automatic`` gives with those settings."""
    data = tmp_path / "data"
    prepare_demo(data, num_images=3, image_size=96, seed=2, val_fraction=0.34)
    torch.manual_seed(0)
    torch.save(SPPNet(image_size=64, instance_head="distance").state_dict(), tmp_path / "model.pt")
    ckpt = str(tmp_path / "model.pt")
    predictor = Predictor(ckpt)
    before = (predictor.threshold, dict(predictor.head_postprocess), dict(predictor.instance_postprocess))
    grid = {"threshold": (0.45, 0.5), "core_threshold": (0.3, 0.7), "min_core_size": (4,), "min_size": (10,)}
    rows = tune_postprocess(predictor, datalist_split(str(data), "validation"), grid)
    assert len(rows) == 4 and [r["aji"] for r in rows] == sorted((r["aji"] for r in rows), reverse=True)
    assert (predictor.threshold, predictor.head_postprocess, predictor.instance_postprocess) == before  # restored
    row = next(r for r in rows if (r["threshold"], r["core_threshold"]) == (0.45, 0.3))
    head = {"core_threshold": 0.3, "min_core_size": 4, "min_size": 10}
    scored = run_evaluate(str(data), str(tmp_path / "e"), ckpt, protocol="automatic", threshold=0.45, head_postprocess=head)
    for key in ("dice", "aji", "pq", "f1"):
        assert row[key] == pytest.approx(scored[key]["mean"], abs=1e-6)
    with pytest.raises(SPPNetError, match="sigma"):
        tune_postprocess(predictor, [], {"sigma": (1.0,)})


def test_evaluate_both_protocols_and_the_classical_baseline(tmp_path):
    data = tmp_path / "data"
    prepare_demo(data, num_images=3, image_size=96, seed=2, val_fraction=0.34)
    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    torch.save(SPPNet(image_size=64, instance_head="distance").state_dict(), tmp_path / "model.pt")
    ckpt = str(tmp_path / "model.pt")
    prompted = run_evaluate(str(data), str(tmp_path / "p"), ckpt, protocol="prompted")
    automatic = run_evaluate(str(data), str(tmp_path / "a"), ckpt, protocol="automatic")
    classical = run_evaluate(str(data), str(tmp_path / "c"), method="classical")
    torch.save(SPPNet(image_size=64, mask_stride=1, instance_head="distance", click_head=True).state_dict(), tmp_path / "click.pt")
    clicked = run_evaluate(str(data), str(tmp_path / "k"), str(tmp_path / "click.pt"), protocol="automatic")
    for result in (prompted, automatic, classical, clicked):
        assert 0 <= result["dice"]["mean"] <= 1 and 0 <= result["aji"]["mean"] <= 1
        assert 0 <= result["clicked_dice"]["mean"] <= 1
        assert "separate_nuclei_images" in result  # synthetic instances separate touching nuclei
    report = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert report["protocol"] == "prompted" and report["instance_sources"] == ["synthetic"]
    assert (tmp_path / "c" / "metrics.csv").read_text().splitlines()[0].startswith("image,instances,dice")
    with pytest.raises(SPPNetError, match="protocol"):
        run_evaluate(str(data), str(tmp_path / "x"), ckpt, protocol="paper")


def test_prompted_protocol_puts_a_ground_truth_click_in_every_window(tmp_path):
    from sppnet_monai.evaluate import window_clicks

    truth = np.zeros((200, 200), dtype=np.int64)
    for index, (r, c) in enumerate([(20, 20), (20, 150), (150, 30), (160, 170)], start=1):
        truth[r : r + 12, c : c + 12] = index

    class Stub:
        inferer = SlidingWindowInferer((128, 128), overlap=0.25)

    from sppnet_monai.transforms import CenterNeighborhoodPointSampled

    clicks = window_clicks(truth, CenterNeighborhoodPointSampled("label").set_random_state(0), Stub())
    windows = window_grid(truth.shape, (128, 128), 0.25)
    assert len(clicks["foreground"]) == len(windows) == len(clicks["background"])
    for (rows, cols), (x, y) in zip(windows, clicks["foreground"]):
        assert rows.start <= y < rows.stop and cols.start <= x < cols.stop and truth[y, x] > 0


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is committed with the repository")
def test_shipped_model_is_the_default_and_says_where_it_comes_from():
    release = read_release(SHIPPED)
    assert "CC BY-NC-SA 4.0" in release["license"] and "monai.bundle run training" in release["command"]
    assert SHIPPED.stat().st_size <= 25 * 2**20
    predictor = Predictor()
    assert Path(predictor.checkpoint) == SHIPPED and predictor.network.instance_head == read_recipe(SHIPPED)["instance_head"] and predictor.image_size == 256
    assert Path(DEFAULT_CONFIG).parent.parent == SHIPPED.parent.parent

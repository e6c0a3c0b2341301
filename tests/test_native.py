"""Native-resolution SPPNet, the click head and bf16 on CPU: shapes, gradients, old checkpoints, targets, loss, the click rule."""

import numpy as np
import pytest
import torch

from sppnet_monai import precision
from sppnet_monai.inferers import CPUAutocastInferer
from sppnet_monai.losses import MaskInstanceLoss
from sppnet_monai.networks import SPPNet, clicked_channel
from sppnet_monai.networks.checkpoints import EXTRA_STATE_KEY, load_checkpoint, read_recipe
from sppnet_monai.transforms import NucleiInstanceTargetd


def _image(batch: int, size: int, click=(20, 30)) -> torch.Tensor:
    image = torch.zeros(batch, 5, size, size)
    image[:, :3] = torch.randn(batch, 3, size, size)
    image[:, 3, click[1], click[0]] = 1.0
    image[:, 4, 2, 2] = 1.0
    return image


@pytest.mark.parametrize("mask_stride,instance_head", [(1, "distance"), (2, "distance"), (1, "hv")])
def test_native_output_shape_and_gradient(mask_stride, instance_head):
    net = SPPNet(image_size=64, mask_stride=mask_stride, instance_head=instance_head, click_head=True)
    out = net(_image(2, 64))
    channels = {"distance": 3, "hv": 4}[instance_head]  # mask, the instance maps (hv: two spare tokens), clicked nucleus
    assert out.shape == (2, channels, 64, 64) and net.out_channels == channels and net.clicked_channel == channels - 1
    # The decoder draws the masks at 1 / mask_stride: no interpolation when it is 1.
    low_res = net.predict(_image(1, 64)[:, :3], torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])).low_res_masks
    assert low_res.shape[-1] == 64 // mask_stride
    out[:, 0].mean().backward()
    stages = net.mask_decoder.upscaling_stages
    assert len(stages) == {1: 2, 2: 1}[mask_stride]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stages.parameters())
    assert net.llsie.llsie.head[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mask_stride", [1, 2])
def test_residual_units_deepen_every_scale_but_the_finest(mask_stride):
    """residual_units add MONAI residual units at the coarser scales; they learn, and the masks keep their shape."""
    plain = SPPNet(image_size=64, mask_stride=mask_stride, click_head=True)
    deep = SPPNet(image_size=64, mask_stride=mask_stride, click_head=True, residual_units=2)
    assert deep.recipe["residual_units"] == 2 and plain.recipe["residual_units"] == 0
    plain_state, deep_state = plain.state_dict(), deep.state_dict()
    assert all(deep_state[key].shape == value.shape for key, value in plain_state.items() if key != "_extra_state")  # kept
    assert all(".units." in key for key in set(deep_state) - set(plain_state))
    assert not any(".units." in key for key in plain_state)  # a plain network's keys are those of older checkpoints
    # Units at every level coarser than the masks and after every upscaling stage but the last, none at the masks' scale.
    assert isinstance(deep.llsie.units[0], torch.nn.Identity)
    assert not any(isinstance(level, torch.nn.Identity) for level in deep.llsie.units[1:])
    stages = deep.mask_decoder.upscaling_stages
    assert stages[-1].units is None and all(stage.units is not None for stage in stages[:-1])
    new_parameters = sum(p.numel() for name, p in deep.named_parameters() if ".units." in name)
    assert new_parameters == {1: 111_744, 2: 37_248}[mask_stride]
    out = deep(_image(2, 64))
    assert out.shape == (2, 2, 64, 64)
    out[:, 0].mean().backward()
    # Weights only: a convolution's bias before batch norm has no gradient to speak of.
    weights = [p for name, p in deep.named_parameters() if ".units." in name and name.endswith("weight")]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


@pytest.mark.parametrize("mask_stride", [1, 2])
def test_mask_scale_units_refine_the_last_stage(mask_stride):
    """mask_scale_units add residual units after the last upscaling stage only, at the masks' scale; they learn,
    the other keys stay, the recipe records them, and a network without them refuses their checkpoint in one line."""
    plain = SPPNet(image_size=64, mask_stride=mask_stride, click_head=True, residual_units=2)
    refined = SPPNet(image_size=64, mask_stride=mask_stride, click_head=True, residual_units=2, mask_scale_units=2)
    assert refined.recipe["mask_scale_units"] == 2 and plain.recipe["mask_scale_units"] == 0
    plain_state, refined_state = plain.state_dict(), refined.state_dict()
    assert all(refined_state[key].shape == value.shape for key, value in plain_state.items() if key != "_extra_state")
    last = f"mask_decoder.upscaling_stages.{len(refined.mask_decoder.upscaling_stages) - 1}.units."
    added = set(refined_state) - set(plain_state)
    assert added and all(key.startswith(last) for key in added)
    # Two units of two 3x3 convolutions (+ bias, batch norm) on the 16 full-resolution or 32 half-resolution channels.
    chans = 16 if mask_stride == 1 else 32
    assert sum(p.numel() for name, p in refined.named_parameters() if name.startswith(last)) == 2 * 2 * (chans * chans * 9 + 3 * chans)
    out = refined(_image(2, 64))
    assert out.shape == (2, 2, 64 // 1, 64)
    out[:, 0].mean().backward()
    weights = [p for name, p in refined.named_parameters() if name.startswith(last) and name.endswith("weight")]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_mask_scale_units_need_an_upscaling_stage():
    with pytest.raises(ValueError, match="mask_scale_units"):
        SPPNet(image_size=64, mask_scale_units=1)  # SAM's 1/4 decoder has no upscaling stage


def test_conv_embedding_joins_the_vit_embedding(tmp_path):
    """conv_embedding continues the pyramid to 1/16 and adds it to Tiny-ViT's embedding: it learns, the masks keep their
    shape, the other keys stay, and the setting is in the recipe and refused by a network without it."""
    plain = SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=1)
    hybrid = SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=1, conv_embedding=True)
    assert hybrid.recipe["conv_embedding"] is True and plain.recipe["conv_embedding"] is False
    added = set(hybrid.state_dict()) - set(plain.state_dict())
    assert added and all(key.startswith("conv_embedding.") for key in added)
    features = hybrid.eval().encode(torch.randn(1, 3, 64, 64))
    assert features.embeddings.shape == (1, 256, 4, 4)
    hybrid.conv_embedding.proj.weight.data.zero_()  # no conv contribution: the embedding is Tiny-ViT's (+ the zero bias)
    hybrid.conv_embedding.proj.bias.data.zero_()
    image = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(hybrid.encode(image).embeddings, hybrid.image_encoder(image))
    hybrid = SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=1, conv_embedding=True).train()
    out = hybrid(_image(2, 64))
    assert out.shape == (2, 2, 64, 64)
    out[:, 0].mean().backward()
    weights = [p for name, p in hybrid.named_parameters() if name.startswith("conv_embedding.") and name.endswith("weight")]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    path = tmp_path / "hybrid.pt"
    torch.save(hybrid.state_dict(), path)
    with pytest.raises(ValueError, match="conv_embedding True"):
        load_checkpoint(plain, path)
    with pytest.raises(ValueError, match="conv_embedding"):
        SPPNet(image_size=64, conv_embedding=True)  # no pyramid at SAM's 1/4


@pytest.mark.parametrize("eighth_skip", [True, False])
def test_eighth_skip_carries_the_conv_eighth_to_the_decoder(tmp_path, eighth_skip):
    """With the conv embedding's projection at zero, its 1/8 level reaches the masks only through eighth_skip: gradient
    there with the skip, none without; no weights of its own; recorded, and a checkpoint of the other kind is refused."""
    net = SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=1, conv_embedding=True, eighth_skip=eighth_skip).train()
    other = SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=1, conv_embedding=True, eighth_skip=not eighth_skip)
    assert net.recipe["eighth_skip"] is eighth_skip and set(net.state_dict()) == set(other.state_dict())
    net.conv_embedding.proj.weight.data.zero_()
    out = net(_image(2, 64))
    assert out.shape == (2, 2, 64, 64)
    out[:, 0].mean().backward()
    grad = net.conv_embedding.down[0][0][0].weight.grad
    assert bool(grad is not None and grad.abs().sum() > 0) is eighth_skip
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match="eighth_skip"):
        load_checkpoint(other, path)


def test_eighth_skip_needs_the_conv_embedding():
    with pytest.raises(ValueError, match="eighth_skip"):
        SPPNet(image_size=64, mask_stride=1, eighth_skip=True)


def test_full_resolution_chans_widen_the_finest_level(tmp_path):
    """full_resolution_chans sets the channels of LLSIE and of the last upscaling stage at full resolution; recorded, and
    refused by a network of the other width in one line, and without a full-resolution level."""
    wide = SPPNet(image_size=64, mask_stride=1, instance_head="distance", full_resolution_chans=32).train()
    assert wide.recipe["full_resolution_chans"] == 32 and SPPNet(image_size=64, mask_stride=1).recipe["full_resolution_chans"] == 16
    assert wide.llsie.llsie(torch.randn(1, 3, 64, 64)).shape[1] == 32
    assert wide.mask_decoder.upscaling_stages[-1].up.out_channels == 32
    out = wide(_image(2, 64))
    assert out.shape == (2, 2, 64, 64)
    out[:, 0].mean().backward()
    assert wide.mask_decoder.upscaling_stages[-1].refine[0].weight.grad.abs().sum() > 0
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    with pytest.raises(ValueError, match="full_resolution_chans"):
        load_checkpoint(SPPNet(image_size=64, mask_stride=1, instance_head="distance"), path)
    with pytest.raises(ValueError, match="full_resolution_chans"):
        SPPNet(image_size=64, mask_stride=2, full_resolution_chans=32)


def test_residual_units_need_the_pyramid():
    with pytest.raises(ValueError, match="residual_units"):
        SPPNet(image_size=64, residual_units=1)  # SAM's 1/4 decoder has no pyramid to deepen
    with pytest.raises(ValueError, match="residual_units"):
        SPPNet(image_size=64, mask_stride=1, fusion="none", residual_units=1)


def test_native_checkpoint_before_residual_units_loads_and_runs_as_before(tmp_path):
    """A native checkpoint whose recipe predates residual_units is a network without them, for every path that reads it."""
    from sppnet_monai.workflows import trained_setting

    torch.manual_seed(0)
    old = SPPNet(image_size=64, mask_stride=1, click_head=True).eval()
    state = old.state_dict()
    recipe = dict(state[EXTRA_STATE_KEY]["recipe"])
    recipe.pop("residual_units")
    state[EXTRA_STATE_KEY] = {"recipe": recipe}
    path = tmp_path / "native_0.6.pt"
    torch.save(state, path)
    assert trained_setting(str(path), "residual_units", 0) == 0
    new = SPPNet(image_size=64, mask_stride=1, click_head=True)
    load_checkpoint(new, path)
    image = _image(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(image), old(image))
    with pytest.raises(ValueError, match="residual_units 0"):  # one line naming the setting, not missing keys
        load_checkpoint(SPPNet(image_size=64, mask_stride=1, click_head=True, residual_units=2), path)


@pytest.mark.parametrize("setting, value", [("residual_units", 2), ("mask_scale_units", 1)])
def test_deeper_checkpoint_refused_by_plain_network(tmp_path, setting, value):
    """A checkpoint with extra layers is a one-line error naming the setting for a network without them, and loads into its own."""
    path = tmp_path / "deep.pt"
    torch.save(SPPNet(image_size=64, mask_stride=1, **{setting: value}).state_dict(), path)
    with pytest.raises(ValueError, match=f"{setting} {value}"):
        load_checkpoint(SPPNet(image_size=64, mask_stride=1), path)
    load_checkpoint(SPPNet(image_size=64, mask_stride=1, **{setting: value}), path)


def test_native_decoding_is_finer_than_quarter():
    """A one-pixel-wide stripe in the full-resolution LLSIE input reaches the native logits but is blurred by 4x interpolation."""
    torch.manual_seed(0)
    net = SPPNet(image_size=64, mask_stride=1).eval()
    image = _image(1, 64)
    with torch.no_grad():
        base = net(image)
        image[0, :3, :, 33] += 3.0
        moved = net(image)
    change = (moved - base).abs()[0, 0].mean(dim=0)  # per column
    assert change[33] > 2 * change[40]  # the stripe's own column moves most


@pytest.mark.parametrize("residual_units, eighth_skip, click_branch_units", [(0, False, 0), (2, False, 0), (2, True, 0), (2, False, 2)])
def test_eval_paths_agree_with_training_path_native(residual_units, eighth_skip, click_branch_units):
    """encode + cached decode (eval) gives the training forward's masks, also for two positive clicks (two prompts
    against one image's features)."""
    net = SPPNet(
        image_size=64,
        mask_stride=1,
        click_head=True,
        residual_units=residual_units,
        conv_embedding=eighth_skip,
        eighth_skip=eighth_skip,
        click_branch_units=click_branch_units,
    )
    image = _image(2, 64)
    image[1, 3, 40, 10] = 1.0  # the second image: two positive clicks
    net.train()
    for module in net.modules():  # batch norms in eval, the rest as trained
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        trained = net(image)
        net.eval()
        cached = net(image)
    torch.testing.assert_close(cached, trained, atol=1e-3, rtol=0)


def test_old_checkpoint_loads_and_runs_as_before(tmp_path):
    """A checkpoint whose recipe predates mask_stride, click_head and residual_units loads into the 1/4 network, unchanged."""
    torch.manual_seed(0)
    old = SPPNet(image_size=64).eval()
    state = old.state_dict()
    recipe = dict(state[EXTRA_STATE_KEY]["recipe"])
    for key in ("mask_stride", "click_head", "residual_units"):
        recipe.pop(key)
    state[EXTRA_STATE_KEY] = {"recipe": recipe}
    path = tmp_path / "old.pt"
    torch.save(state, path)
    assert "mask_stride" not in read_recipe(path)
    new = SPPNet(image_size=64)
    load_checkpoint(new, path)
    image = _image(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(image), old(image))


def test_native_checkpoint_refused_by_quarter_network(tmp_path):
    path = tmp_path / "native.pt"
    torch.save(SPPNet(image_size=64, mask_stride=1).state_dict(), path)
    with pytest.raises(ValueError, match="mask_stride 1"):
        load_checkpoint(SPPNet(image_size=64), path)


def test_mobile_sam_loads_into_native_network(tmp_path):
    mobile_sam = pytest.importorskip("mobile_sam")
    reference = mobile_sam.sam_model_registry["vit_t"]()
    path = tmp_path / "mobile_sam.pt"
    torch.save(reference.state_dict(), path)
    net = SPPNet(image_size=64, mask_stride=1, instance_head="distance", click_head=True, click_branch_units=2)
    new_layers = ("llsie.", "mask_decoder.upscaling_stages", "mask_decoder.hyper_proj", "mask_decoder.guidance_proj", "mask_decoder.click_branch")
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(new_layers)}
    assert load_checkpoint(net, path) == "mobile_sam"
    after = net.state_dict()
    assert fresh and all(torch.equal(v, after[k]) for k, v in fresh.items())  # new layers start fresh
    torch.testing.assert_close(after["mask_decoder.mask_tokens.weight"], reference.mask_decoder.mask_tokens.weight)


def test_click_guidance_map_peaks_at_positive_clicks_only():
    from sppnet_monai.networks.sppnet import click_guidance_map

    coords = torch.tensor([[[20.0, 30.0], [5.0, 5.0]], [[40.0, 8.0], [50.0, 50.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    native = click_guidance_map(coords, labels, 64, 64)
    assert native.shape == (2, 1, 64, 64)
    for index, (x, y) in enumerate([(20, 30), (40, 8)]):
        peak = int(native[index, 0].argmax())
        assert divmod(peak, 64) == (y, x) and native[index, 0, y, x] == pytest.approx(1.0)
    assert native[0, 0, 5, 5] < 1e-3 and native[1, 0, 50, 50] < 1e-3  # negative and padding points leave no mark
    quarter = click_guidance_map(coords, labels, 16, 64)  # at a 1/4 decoder: the same place, a quarter of the size
    assert divmod(int(quarter[0, 0].argmax()), 16) == (7, 5)


def test_click_guidance_moves_the_click_head_with_the_click():
    """With the guidance map the click head's answer depends on where the click is, from the first step on."""
    torch.manual_seed(0)
    net = SPPNet(image_size=64, mask_stride=1, click_head=True).eval()
    image = _image(1, 64, click=(10, 10))
    moved = image.clone()
    moved[0, 3] = 0
    moved[0, 3, 50, 50] = 1.0  # the same image, the click elsewhere
    with torch.no_grad():
        first, second = net(image)[0, 1], net(moved)[0, 1]
    change = (first - second).abs()
    assert change[6:15, 6:15].mean() > 2 * change[25:35, 25:35].mean()  # most where the clicks are (2.3x, random weights)


def test_click_branch_is_the_clicked_nucleus_alone(tmp_path):
    """With click_branch_units the clicked nucleus reads features of its own: the mask learns nothing through the branch,
    the clicked nucleus does, the click still moves it, and the setting is recorded and checked on loading."""
    torch.manual_seed(0)
    net = SPPNet(image_size=64, mask_stride=1, instance_head="distance", click_head=True, click_branch_units=2).train()
    decoder = net.mask_decoder
    assert net.recipe["click_branch_units"] == 2 and decoder.guidance_proj[0].in_channels == 2  # both Gaussians
    assert [unit.conv.unit0.conv.dilation for unit in decoder.click_branch.units] == [(1, 1), (2, 2)]
    out = net(_image(2, 64))
    assert out.shape == (2, 3, 64, 64)
    out[:, 0].mean().backward(retain_graph=True)  # the mask of all nuclei
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in decoder.click_branch.parameters())
    out[:, net.clicked_channel].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.click_branch.guidance_proj.parameters())
    net.eval()
    image = _image(1, 64, click=(10, 10))
    moved = image.clone()
    moved[0, 3] = 0
    moved[0, 3, 50, 50] = 1.0
    with torch.no_grad():
        change = (net(image)[0, 2] - net(moved)[0, 2]).abs()
    assert change[6:15, 6:15].mean() > 2 * change[25:35, 25:35].mean()
    path = tmp_path / "branch.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match="click_branch_units 2"):
        load_checkpoint(SPPNet(image_size=64, mask_stride=1, instance_head="distance", click_head=True), path)
    with pytest.raises(ValueError, match="click_branch_units"):
        SPPNet(image_size=64, mask_stride=1, click_branch_units=2)  # no click head to give features to


def test_click_branch_guidance_has_a_narrow_and_a_wide_gaussian():
    from sppnet_monai.networks.sppnet import CLICK_BRANCH_SIGMAS, click_guidance_map

    guidance = click_guidance_map(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]]), 64, 64, CLICK_BRANCH_SIGMAS)
    assert guidance.shape == (1, 2, 64, 64) and guidance[0, :, 30, 20].tolist() == [1.0, 1.0]
    narrow, wide = guidance[0, :, 30, 32]  # 12 pixels right of the click: a large nucleus's radius
    assert narrow < 0.02 and wide == pytest.approx(float(np.exp(-0.5)), abs=1e-4)


def _touching_pair() -> np.ndarray:
    """(1, 32, 32) instance map: two touching discs, ids 1 and 2."""
    yy, xx = np.mgrid[:32, :32]
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[(yy - 16) ** 2 + (xx - 10) ** 2 <= 36] = 1
    labels[((yy - 16) ** 2 + (xx - 21) ** 2 <= 36) & (labels == 0)] = 2
    return labels[None]


def test_click_target_is_the_clicked_one_of_two_touching_nuclei():
    labels = _touching_pair()
    target = NucleiInstanceTargetd("label", click_key="foreground")({"label": labels, "foreground": [[22, 16]], "instances": "xml"})["label"]
    assert target.shape == (4, 32, 32)
    np.testing.assert_array_equal(target[3] > 0, labels[0] == 2)
    on_background = NucleiInstanceTargetd("label", click_key="foreground")({"label": labels, "foreground": [[0, 0]]})["label"]
    assert on_background[3].sum() == 0


def test_loss_learns_the_click_head_on_every_image_and_the_instance_map_where_known():
    loss = MaskInstanceLoss("dice_ce", clicked_channel=clicked_channel("distance", True))
    target = torch.from_numpy(
        NucleiInstanceTargetd("label", click_key="foreground")({"label": _touching_pair(), "foreground": [[10, 16]]})["label"]
    )[None].float()
    right = torch.stack([target[:, 0], target[:, 1], target[:, 3]], dim=1) * 20 - 10
    wrong_click = right.clone()
    wrong_click[:, 2] = target[:, 0] * 20 - 10  # both nuclei instead of the clicked one
    wrong_map = right.clone()
    wrong_map[:, 1] = -right[:, 1]
    unknown = target.clone()
    unknown[:, 2] = 0  # a binary mask's components: the instance map is not learnt there
    for known in (target, unknown):
        assert loss(wrong_click, known) > loss(right, known) + 0.2
    assert loss(wrong_map, target) > loss(right, target) + 0.2
    assert loss(wrong_map, unknown) == pytest.approx(float(loss(right, unknown)), abs=1e-4)


@pytest.fixture(scope="module")
def click_head_predictor(tmp_path_factory):
    """A Predictor of a tiny network of ``native_cpu.json``'s design: native, residual units, instance and click heads (random weights)."""
    from sppnet_monai.predict import Predictor

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    net = SPPNet(image_size=64, mask_stride=1, residual_units=2, instance_head="distance", click_head=True)
    torch.save(net.state_dict(), path)
    return Predictor(str(path))


def test_predictor_builds_the_recorded_native_network(click_head_predictor):
    network = click_head_predictor.network
    assert (network.mask_stride, network.click_head, click_head_predictor.clicked_channel) == (1, True, 2)
    assert network.recipe["residual_units"] == 2


def test_clicked_instances_returns_the_clicked_one_of_two_touching_nuclei(click_head_predictor):
    """The click rule on the click head's logits: the piece under each click, one id per click, nothing else."""
    labels = _touching_pair()[0]
    logits = torch.full((3, 32, 32), -10.0)
    logits[2][torch.from_numpy(labels == 2)] = 10.0  # the click head separates touching nuclei
    logits[2, 28:31, 28:31] = 10.0  # a piece nobody clicked
    instances = click_head_predictor.clicked_instances(logits, [[22, 16]])
    np.testing.assert_array_equal(instances, (labels == 2).astype(np.int32))


def test_edit_instances_adds_and_removes_by_clicks(click_head_predictor):
    labels = _touching_pair()[0].astype(np.int32)
    edited = click_head_predictor.edit_instances(labels, [], [[21, 16]], lambda click: None)  # negative click on nucleus 2
    np.testing.assert_array_equal(edited, (labels == 1).astype(np.int32))
    added = click_head_predictor.edit_instances(np.zeros_like(labels), [[10, 16]], [], lambda click: labels == 1)
    np.testing.assert_array_equal(added, (labels == 1).astype(np.int32))
    untouched = click_head_predictor.edit_instances(labels, [[10, 16]], [], lambda click: np.ones_like(labels, dtype=bool))
    np.testing.assert_array_equal(untouched, labels)  # a positive click on a nucleus already there adds nothing


def test_clicked_logits_are_the_forward_click_channel_of_their_window(click_head_predictor):
    """Several clicks decoded against one encoding of a window give, each, the network's forward pass on that window."""
    predictor = click_head_predictor
    torch.manual_seed(1)
    rgb = torch.rand(3, 96, 80) * 255
    window, clicks = (16, 32, 64, 64), [[40, 50], [70, 90]]  # image pixels, inside the window
    logits = predictor.clicked_logits({"image": rgb}, clicks, window)
    assert logits.shape == (2, 64, 64)
    crop = rgb[:, 32:96, 16:80]
    background = predictor.prompt({"image": crop, "foreground": [], "background": []})[4]
    for index, (x, y) in enumerate(clicks):
        image = predictor.prompt({"image": crop, "foreground": [[x - 16, y - 32]], "background": []})
        image[4] = background  # the window's automatic background click, as clicked_logits uses it
        with torch.no_grad(), predictor.autocast():
            forward = predictor.network(image[None])[0, 2].float()
        scale = forward.abs().max().item()
        torch.testing.assert_close(logits[index], forward, atol=0.05 * scale, rtol=0)
    assert (logits[0] - logits[1]).abs().max() > 0.05 * logits.abs().max()  # each click its own answer


def test_bf16_and_float32_agree_on_a_tiny_network(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # the numerics, on any CPU
    torch.manual_seed(0)
    net = SPPNet(image_size=64, mask_stride=1, instance_head="distance").eval()
    image = _image(2, 64)
    with torch.no_grad():
        float32 = CPUAutocastInferer(lambda x, n: n(x), cpu_bf16=False)(image, net)
        bf16 = CPUAutocastInferer(lambda x, n: n(x), cpu_bf16=True)(image, net)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, float32)  # it did run in bfloat16
    agree = ((bf16[:, 0] > 0) == (float32[:, 0] > 0)).float().mean()
    assert agree > 0.98, agree
    torch.testing.assert_close(bf16, float32, atol=0.1 * float32.abs().max().item(), rtol=0)


def test_autocast_rule(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert not precision.autocast("cpu", cpu_bf16=True)._enabled  # no bf16 units: float32
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.autocast("cpu", cpu_bf16=True)._enabled
    assert not precision.autocast("cpu", cpu_bf16=False)._enabled
    assert not precision.autocast("cuda", amp=False)._enabled

"""SPPNet network: shapes, the three call paths, the paper's size, and bad input."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from sppnet_monai.networks import SPPNet, clicks_from_guidance


def _image(batch: int, height: int, width: int, clicks=((10, 20), (3, 5))) -> torch.Tensor:
    """(B, 5, H, W) random normalised image with a positive click (x, y) and a negative click (x, y)."""
    image = torch.zeros(batch, 5, height, width)
    image[:, :3] = torch.randn(batch, 3, height, width)
    (px, py), (nx, ny) = clicks
    image[:, 3, py, px] = 1.0
    image[:, 4, ny, nx] = 1.0
    return image


@pytest.fixture(scope="module")
def net() -> SPPNet:
    torch.manual_seed(0)
    return SPPNet(image_size=64).eval()


def test_info_cli_reports_paper_size():
    """Table 1 of the paper: 9.79M parameters and 39.90 GMACs at 1024x1024."""
    out = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "info", "--image_size", "1024"],
        capture_output=True, text=True, check=True,
    )
    info = json.loads(out.stdout)
    assert abs(info["parameters"] / 9.79e6 - 1) <= 0.01, info
    assert abs(info["gmacs"] / 39.90 - 1) <= 0.05, info


def test_encoder_keeps_stride_16():
    encoder = SPPNet(image_size=128).image_encoder
    assert encoder(torch.randn(1, 3, 128, 128)).shape == (1, 256, 8, 8)


def test_clicks_from_guidance_reads_x_as_column():
    maps = torch.zeros(2, 2, 6, 9)
    maps[0, 0, 4, 7] = 1.0  # row 4, column 7 -> (x=7, y=4)
    maps[0, 1, 1, 2] = 1.0
    maps[1, 0, 5, 8] = 1.0  # second image: no negative click
    coords, labels = clicks_from_guidance(maps)
    assert coords[0].tolist() == [[7.0, 4.0], [2.0, 1.0]]
    assert labels.tolist() == [[1, 0], [1, -1]]
    assert coords[1, 0].tolist() == [8.0, 5.0]


@pytest.mark.parametrize("fusion", ["add", "concat", "none"])
def test_forward_shape_and_gradients(fusion):
    net = SPPNet(image_size=64, fusion=fusion)
    out = net(_image(2, 64, 64))
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    assert net.image_encoder.patch_embed.conv1.conv.weight.grad.abs().sum() > 0
    if fusion != "none":
        assert net.llsie[0].head[0].weight.grad.abs().sum() > 0


def test_smaller_image_is_padded_and_cropped(net):
    image = _image(1, 50, 60)
    out = net(image)
    assert out.shape == (1, 1, 50, 60)
    padded = torch.zeros(1, 5, 64, 64)
    padded[..., :50, :60] = image
    torch.testing.assert_close(out, net(padded)[..., :50, :60])


def test_three_call_paths_agree(net):
    image = _image(1, 64, 64, clicks=((40, 12), (5, 60)))
    with torch.no_grad():
        from_maps = net(image)
        coords = torch.tensor([[[40.0, 12.0], [5.0, 60.0]]])
        labels = torch.tensor([[1, 0]])
        explicit = net.predict(image[:, :3], coords, labels).masks
        torch.testing.assert_close(from_maps, explicit)

        # Several prompts decoded in one batch against one cached embedding.
        features = net.encode(image[:, :3])
        many = torch.tensor([[[40.0, 12.0], [5.0, 60.0]], [[20.0, 30.0], [5.0, 60.0]], [[1.0, 1.0], [0.0, 0.0]]])
        batched = net.decode(features, many, labels.expand(3, -1)).masks
        assert batched.shape == (3, 1, 64, 64)
        torch.testing.assert_close(batched[:1], explicit, atol=1e-5, rtol=1e-5)
        single = net.decode(features, many[1:2], labels).masks
        torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-5)


def test_batch_pairs_each_image_with_its_own_prompt(net):
    """SAM's decoder repeats every embedding for every prompt (B*B masks); SPPNet pairs them."""
    images = torch.cat([_image(1, 64, 64, ((10, 10), (50, 50))), _image(1, 64, 64, ((30, 40), (2, 2)))])
    with torch.no_grad():
        batched = net(images)
        singles = torch.cat([net(images[:1]), net(images[1:])])
    assert batched.shape == (2, 1, 64, 64)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_missing_click_is_a_padding_point(net):
    image = _image(1, 64, 64)
    image[:, 4] = 0.0  # no background click
    with torch.no_grad():
        out = net(image)
        features = net.encode(image[:, :3])
        padding = net.decode(features, torch.tensor([[[10.0, 20.0], [0.0, 0.0]]]), torch.tensor([[1, -1]])).masks
    torch.testing.assert_close(out, padding)  # SAM's padding point, not a click at (0, 0)
    with torch.no_grad():
        clicked = net.decode(features, torch.tensor([[[10.0, 20.0], [0.0, 0.0]]]), torch.tensor([[1, 0]])).masks
    assert not torch.allclose(out, clicked)


def test_multimask_output():
    net = SPPNet(image_size=64, multimask_output=True).eval()
    image = _image(1, 64, 64)
    with torch.no_grad():
        out = net(image)
        reference = net.decode(net.encode(image[:, :3]), torch.tensor([[[10.0, 20.0], [3.0, 5.0]]]), torch.tensor([[1, 0]]))
        single = net.decode(net.encode(image[:, :3]), torch.tensor([[[10.0, 20.0], [3.0, 5.0]]]), torch.tensor([[1, 0]]), multimask_output=False)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, reference.masks)
    assert not torch.allclose(out[:, :1], single.masks)  # the three candidates are SAM's tokens 1-3, not token 0


def test_several_positive_clicks_are_the_union_of_their_prompts(net):
    """The click rule (sppnet_monai.clicks): one prompt per positive click, with the first negative click in scan order."""
    image = _image(1, 64, 64, clicks=((10, 20), (50, 3)))
    image[0, 3, 40, 30] = 1.0  # a second positive click
    image[0, 4, 60, 5] = 1.0  # a second negative click, later in scan order
    with torch.no_grad():
        union = net(image)
        features = net.encode(image[:, :3])
        prompts = torch.tensor([[[10.0, 20.0], [50.0, 3.0]], [[30.0, 40.0], [50.0, 3.0]]])
        each = net.decode(features, prompts, torch.tensor([[1, 0], [1, 0]])).masks
    torch.testing.assert_close(union, each.amax(dim=0, keepdim=True))
    assert not torch.allclose(each[0], each[1])


def test_recipe_is_saved_with_the_weights_and_checked_on_load(tmp_path):
    from sppnet_monai.networks.checkpoints import load_checkpoint, read_recipe
    from sppnet_monai.utils import SPPNetError

    trained = SPPNet(image_size=64, fusion="concat")
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    recipe = read_recipe(tmp_path / "model.pt")
    assert {k: recipe[k] for k in ("image_size", "fusion")} == {"image_size": 64, "fusion": "concat"} and recipe["version"]
    loaded = SPPNet(image_size=recipe["image_size"], fusion=recipe["fusion"])
    load_checkpoint(loaded, tmp_path / "model.pt")
    for name, value in loaded.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, trained.state_dict()[name])
    with pytest.raises(SPPNetError, match="trained with image_size 64 .this network: 128."):
        load_checkpoint(SPPNet(image_size=128, fusion="concat"), tmp_path / "model.pt")


def test_old_plain_state_dict_still_loads(tmp_path):
    """Checkpoints saved before the recipe existed: no _extra_state, loaded into a network built by hand."""
    from sppnet_monai.networks.checkpoints import load_checkpoint, read_recipe

    old = {k: v for k, v in SPPNet(image_size=64).state_dict().items() if k != "_extra_state"}
    torch.save(old, tmp_path / "old.pt")
    assert read_recipe(tmp_path / "old.pt") == {}
    net = SPPNet(image_size=128)
    assert load_checkpoint(net, tmp_path / "old.pt") == "sppnet"
    torch.testing.assert_close(net.mask_decoder.iou_token.weight, old["mask_decoder.iou_token.weight"])
    strict = SPPNet(image_size=64)
    strict.load_state_dict(old)  # strict, as MONAI's CheckpointLoader resumes a run begun before 0.2
    assert strict.loaded_recipe == {}


def test_torchscript_trace_matches_eager(net):
    image = _image(1, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(net, image, check_trace=False)
        other = _image(1, 64, 64, clicks=((33, 44), (60, 1)))
        torch.testing.assert_close(traced(other), net(other), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda: torch.randn(1, 3, 64, 64), ValueError, r"\(B, 5, H, W\)"),
        (lambda: torch.randn(5, 64, 64), ValueError, r"\(B, 5, H, W\)"),
        (lambda: torch.zeros(1, 5, 64, 64, dtype=torch.uint8), TypeError, "floating-point"),
        (lambda: torch.randn(1, 5, 80, 64), ValueError, "tile it"),
    ],
)
def test_bad_image_input(net, make_input, error, match):
    with pytest.raises(error, match=match):
        net(make_input())


@pytest.mark.parametrize("image_size", [0, 48, 100])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="multiple of 16"):
        SPPNet(image_size=image_size)


def test_bad_fusion():
    with pytest.raises(ValueError, match="fusion"):
        SPPNet(image_size=64, fusion="sum")


def test_click_outside_image(net):
    features = net.encode(torch.randn(1, 3, 50, 60))
    labels = torch.tensor([[1, 0]])
    with pytest.raises(ValueError, match=r"point click \[60, 3\] is outside the image \(60x50"):
        net.decode(features, torch.tensor([[[60.0, 3.0], [1.0, 1.0]]]), labels)
    with pytest.raises(ValueError, match="outside"):
        net.decode(features, torch.tensor([[[5.0, -1.0], [1.0, 1.0]]]), labels)
    # A padding point (label -1) may lie anywhere: SAM puts it at (0, 0) or ignores it.
    net.decode(features, torch.tensor([[[5.0, 5.0], [-10.0, 99.0]]]), torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"\(P, N, 2\)"):
        net.decode(features, torch.tensor([[5.0, 5.0]]), torch.tensor([1]))


def test_optimize_for_inference_keeps_outputs():
    """Folded batch norms and channels-last weights give the same masks as the network as trained."""
    net = SPPNet(image_size=64).eval()
    with torch.no_grad():
        for module in net.modules():  # non-trivial statistics, so that folding them matters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
        image = torch.randn(2, 5, 48, 64).clamp(min=0)
        image[:, 3:] = 0
        image[:, 3, 20, 30] = image[:, 4, 2, 2] = 1.0
        expected = net(image)
        fast = copy.deepcopy(net).optimize_for_inference()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.image_encoder.modules())
        assert not any(getattr(m, "fused_attn", False) for m in fast.image_encoder.modules())
        torch.testing.assert_close(fast(image), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fusion,multimask", [("add", False), ("concat", True), ("none", False)])
def test_cached_decoding_matches_segment_anything(fusion, multimask):
    """Eval-mode features carry the decoder's per-image work; decoding with it equals SAM's own transformer."""
    torch.manual_seed(1)
    net = SPPNet(image_size=64, fusion=fusion, multimask_output=multimask).eval()
    with torch.no_grad():
        for module in net.mask_decoder.transformer.modules():  # non-trivial norms and biases
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        images = _image(2, 64, 64)[:, :3]
        one, two = net.encode(images[:1]), net.encode(images)
        assert one.decoder_cache is not None
        many = torch.tensor([[[40.0, 12.0], [5.0, 60.0]], [[20.0, 30.0], [0.0, 0.0]], [[1.0, 1.0], [63.0, 2.0]]])
        labels = torch.tensor([[1, 0], [1, -1], [1, 0]])
        for features, coords, point_labels in ((one, many, labels), (two, many[:2], labels[:2])):
            cached = net.decode(features, coords, point_labels)
            reference = net.decode(features._replace(decoder_cache=None), coords, point_labels)
            assert reference.masks.abs().mean() > 0.01
            torch.testing.assert_close(cached.low_res_masks, reference.low_res_masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cached.iou_predictions, reference.iou_predictions, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="image_embeddings has batch 2 but there are 3 prompts"):
            net.decode(two, many, labels)
    assert net.train().encode(images).decoder_cache is None

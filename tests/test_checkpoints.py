"""Checkpoint loading, proven against the reference architectures with random weights.

MobileSAM (PyPI ``mobilesam-mirror``) and SAM (``segment-anything``) are built with random
weights, their state dicts saved and loaded into SPPNet: same state dict in, same numbers out.
"""

import pytest
import torch
from monai.networks.nets import BasicUNet

from sppnet_monai.networks import SPPNet
from sppnet_monai.networks.checkpoints import detect_checkpoint_kind, load_checkpoint, read_state_dict
from sppnet_monai.utils import SPPNetError


def _randomise(module: torch.nn.Module) -> None:
    """Give every tensor, normalisation statistics and attention biases included, non-trivial values,
    so that a mis-mapped key cannot go unnoticed."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or "positional_encoding" in name:
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif name.endswith(("norm.weight", "bn.weight")) or ".neck.1." in name or ".neck.3." in name:
                tensor.copy_(1.0 + 0.2 * noise)
            elif tensor.ndim <= 1 or "attention_biases" in name:
                tensor.copy_(0.2 * noise)
            elif name.startswith("mask_decoder.") and tensor.ndim == 2:
                tensor.mul_(3.0)  # default init leaves masks near 0 and almost blind to the prompt


@pytest.fixture(scope="module")
def mobile_sam_checkpoint(tmp_path_factory):
    from mobile_sam import sam_model_registry

    torch.manual_seed(0)
    reference = sam_model_registry["vit_t"]()
    _randomise(reference)
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt"
    torch.save(reference.state_dict(), path)
    # MobileSAM caches its attention biases when switched to eval: only now are they final.
    return reference.eval(), path


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    reference = build_sam_vit_b()
    _randomise(reference)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_01ec64.pth"
    torch.save(reference.state_dict(), path)
    return reference.eval(), path


def test_mobile_sam_equivalence(mobile_sam_checkpoint):
    reference, path = mobile_sam_checkpoint
    net = SPPNet(image_size=1024, fusion="none")
    assert load_checkpoint(net, path) == "mobile_sam"
    net.eval()
    image = torch.randn(1, 3, 1024, 1024)
    coords = torch.tensor([[[500.0, 300.0], [120.0, 900.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        ref_embedding = reference.image_encoder(image)
        sparse, dense = reference.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ref_masks, ref_iou = reference.mask_decoder(
            image_embeddings=ref_embedding,
            image_pe=reference.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        features = net.encode(image)
        ours = net.decode(features, coords, labels)
        other_prompt = net.decode(features, coords.flip(1), labels).low_res_masks
    # The comparison means something: another prompt moves the masks far beyond the tolerance.
    assert ref_embedding.abs().mean() > 0.1 and (other_prompt - ref_masks).abs().max() > 1e-3
    torch.testing.assert_close(features.embeddings, ref_embedding, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.low_res_masks, ref_masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.iou_predictions, ref_iou, atol=1e-4, rtol=0)


def test_mobile_sam_into_llsie_network_keeps_llsie(mobile_sam_checkpoint):
    _, path = mobile_sam_checkpoint
    net = SPPNet(image_size=64, fusion="concat")
    llsie_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(("llsie.", "mask_decoder.fusion_proj"))}
    load_checkpoint(net, path, kind="mobile_sam")
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in llsie_before.items())


def test_sam_prompt_encoder_and_decoder_equivalence(sam_checkpoint):
    reference, path = sam_checkpoint
    net = SPPNet(image_size=1024, fusion="none")
    encoder_before = {k: v.clone() for k, v in net.image_encoder.state_dict().items()}
    assert load_checkpoint(net, path) == "sam"
    net.eval()
    assert all(torch.equal(v, net.image_encoder.state_dict()[k]) for k, v in encoder_before.items())
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.tensor([[[10.0, 1000.0], [700.0, 20.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, dense = reference.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ref_masks, ref_iou = reference.mask_decoder(embedding, reference.prompt_encoder.get_dense_pe(), sparse, dense, False)
        features = net.encode(torch.zeros(1, 3, 1024, 1024))._replace(embeddings=embedding, decoder_cache=None)
        ours = net.decode(features, coords, labels)
        # The per-click path: segment-anything's transformer evaluated against the cached image tokens.
        pe = net.prompt_encoder.get_dense_pe()
        cache = net.mask_decoder.cache_image(embedding, pe, dense)
        cached_masks, cached_iou = net.mask_decoder(embedding, None, sparse, dense, False, image_cache=cache)
    assert ref_masks.abs().mean() > 0.1
    for masks, iou in ((ours.low_res_masks, ours.iou_predictions), (cached_masks, cached_iou)):
        torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
        torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=0)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"network": sd, "optimizer": {}},
                                  lambda sd: {"module." + k: v for k, v in sd.items()}])
def test_sppnet_checkpoint_round_trip(tmp_path, wrap):
    source = SPPNet(image_size=64, fusion="add")
    _randomise(source)
    path = tmp_path / "model.pt"
    torch.save(wrap(source.state_dict()), path)
    target = SPPNet(image_size=64, fusion="add")
    assert load_checkpoint(target, path) == "sppnet"
    for key, value in source.state_dict().items():
        if key == "_extra_state":  # the recipe, not a weight
            assert value == target.state_dict()[key]
            continue
        assert torch.equal(value, target.state_dict()[key]), key


def _assert_unchanged_after_error(net, path, match):
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(SPPNetError, match=match):
        load_checkpoint(net, path)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "unet.pt"
    torch.save(BasicUNet(spatial_dims=2, in_channels=5, out_channels=1).state_dict(), path)
    _assert_unchanged_after_error(SPPNet(image_size=64), path, "not a MobileSAM, SAM or SPPNet checkpoint")


def test_missing_and_unexpected_keys_are_named(tmp_path, mobile_sam_checkpoint):
    _, mobile_path = mobile_sam_checkpoint
    state = read_state_dict(mobile_path)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    _assert_unchanged_after_error(
        SPPNet(image_size=64), path, r"unexpected keys \(1\): mask_decoder\.extra\.weight.*missing keys \(1\): mask_decoder\.iou_token\.weight"
    )


def test_shape_mismatch_and_llsie_mode_mismatch(tmp_path):
    concat = SPPNet(image_size=64, fusion="concat")
    path = tmp_path / "concat.pt"
    torch.save(concat.state_dict(), path)
    # The recorded recipe names the contradiction before any key is compared.
    _assert_unchanged_after_error(SPPNet(image_size=64, fusion="add"), path, r"trained with fusion 'concat' \(this network: 'add'\)")
    # Without a recipe (a checkpoint saved before 0.2), an "add" network has no fusion_proj: the extra keys are named.
    torch.save({k: v for k, v in concat.state_dict().items() if k != "_extra_state"}, path)
    _assert_unchanged_after_error(SPPNet(image_size=64, fusion="add"), path, r"unexpected keys \(2\): mask_decoder\.fusion_proj")
    state = concat.state_dict()
    state["mask_decoder.fusion_proj.weight"] = torch.zeros(32, 16, 1, 1)
    torch.save(state, path)
    _assert_unchanged_after_error(SPPNet(image_size=64, fusion="concat"), path, r"shape mismatch \(1\)")


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SPPNetError, match=r"garbage\.pt: not a PyTorch checkpoint \(a text file starting 'not a checkpoint'\)\.$"):
        load_checkpoint(SPPNet(image_size=64), garbage)
    with pytest.raises(SPPNetError, match="does not exist"):
        load_checkpoint(SPPNet(image_size=64), tmp_path / "absent.pt")


def test_detect_kind():
    assert detect_checkpoint_kind({"image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(1)}) == "mobile_sam"
    assert detect_checkpoint_kind({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(1)}) == "sam"
    assert detect_checkpoint_kind({"image_encoder.stages.0.x": torch.zeros(1)}) == "sppnet"
    assert detect_checkpoint_kind({"conv.weight": torch.zeros(1)}) == "unknown"

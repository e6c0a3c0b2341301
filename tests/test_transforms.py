"""Tests for sppnet_monai.transforms: EnsureRGBd, CenterNeighborhoodPointSampled, AddClickGuidanceChannelsd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandRotate90d,
    RandRotated,
    RandSpatialCropd,
    Resized,
)
from monai.utils import set_determinism

from sppnet_monai.data.image_io import to_rgb_uint8
from sppnet_monai.transforms import (
    AddClickGuidanceChannelsd,
    CenterNeighborhoodPointSampled,
    EnsureRGBd,
    nucleus_center,
)

SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]
K = 2


# ----------------------------------------------------------------------------------------------------------
# Synthetic data and independent brute-force reference
# ----------------------------------------------------------------------------------------------------------
def make_label() -> np.ndarray:
    """A non-square (1, 40, 56) instance map with awkward nuclei: ties, borders, touching, tiny, concave."""
    lab = np.zeros((40, 56), dtype=np.int32)
    yy, xx = np.mgrid[:40, :56]
    lab[(yy - 12) ** 2 + (xx - 14) ** 2 <= 49] = 3  # disc, radius 7
    lab[28:34, 4:14] = 5  # 6 x 10 rectangle: a whole row of tied maxima
    lab[0:6, 30:41] = 7  # touches the top border
    lab[14:24, 30:38] = 8  # 8 and 9 share an edge
    lab[14:24, 38:46] = 9
    lab[36:38, 50:52] = 12  # 2 x 2: most of the 5 x 5 neighbourhood is outside
    lab[27, 20] = 4  # a single pixel
    lab[28:38, 26:30] = 20  # an L shape (concave)
    lab[34:38, 26:40] = 20
    lab[30:40, 50:56] = 21  # bottom-right corner
    lab[36:38, 50:52] = 12
    return lab[None]


def brute_force_center(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) maximising the min L1 distance to a non-nucleus pixel (outside the image counts); first in scan order."""
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded)
    best, best_rc = -1, None
    for r, c in np.argwhere(padded):  # argwhere is row-major: the first strict maximum is the first in scan order
        dist = np.min(np.abs(outside[:, 0] - r) + np.abs(outside[:, 1] - c))
        if dist > best:
            best, best_rc = dist, (r - 1, c - 1)
    return int(best_rc[1]), int(best_rc[0])


def draws(transform, data, n):
    out = []
    for _ in range(n):
        d = transform(data)
        out.append((tuple(d["foreground"][0]) if d["foreground"] else None,
                    tuple(d["background"][0]) if d["background"] else None,
                    d["prompt_instance"]))
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading convention, EnsureRGBd, NormalizeIntensityd
# ----------------------------------------------------------------------------------------------------------
def test_loadimaged_orientation_rgba_and_16bit(tmp_path):
    h, w = 5, 8
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[1, 6] = [10, 20, 30, 40]  # row 1, column 6
    lab = np.zeros((h, w), np.uint16)
    lab[1, 6], lab[4, 0] = 300, 65535
    Image.fromarray(rgba).save(tmp_path / "img.png")
    Image.fromarray(lab).save(tmp_path / "lab.png")
    loader = LoadImaged(keys=["image", "label"], reader="PILReader", reverse_indexing=False, ensure_channel_first=True)
    d = loader({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "lab.png")})
    assert tuple(d["image"].shape) == (4, h, w) and tuple(d["label"].shape) == (1, h, w)
    assert d["image"][:, 1, 6].tolist() == [10, 20, 30, 40]
    assert d["label"][0, 1, 6] == 300 and d["label"][0, 4, 0] == 65535
    rgb = EnsureRGBd(keys="image")(d)["image"]
    assert isinstance(rgb, MetaTensor) and tuple(rgb.shape) == (3, h, w) and rgb.dtype == torch.float32
    alpha = 40 / 255  # composited over white
    np.testing.assert_allclose(rgb[:, 1, 6].numpy(), [v * alpha + 255 * (1 - alpha) for v in (10, 20, 30)], rtol=1e-5)
    assert rgb[:, 0, 0].tolist() == [255.0, 255.0, 255.0]  # fully transparent: white
    assert rgb.meta["filename_or_obj"] == str(tmp_path / "img.png")


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((1, 2, 3), 7, np.uint8), np.full((3, 2, 3), 7.0)),  # gray repeated
        (np.stack([np.full((2, 3), 9), np.full((2, 3), 200)]).astype(np.uint8),
         np.full((3, 2, 3), 9.0 * 200 / 255 + 255.0 * 55 / 255)),  # LA: over white
        (np.array([10, 20, 30, 0], np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8),
         np.full((3, 2, 3), 255.0)),  # RGBA, transparent: white
        (np.array([10, 20, 30, 255], np.uint8)[:, None, None] * np.ones((1, 2, 3), np.uint8),
         np.array([10.0, 20.0, 30.0])[:, None, None] * np.ones((1, 2, 3))),  # RGBA, opaque: kept
        (np.array([65535, 0, 0, 65535], np.uint16)[:, None, None] * np.ones((1, 2, 3), np.uint16),
         np.array([255.0, 0.0, 0.0])[:, None, None] * np.ones((1, 2, 3))),  # 16-bit RGBA, opaque
        (np.full((3, 2, 3), 65535, np.uint16), np.full((3, 2, 3), 255.0)),  # 16-bit
        (np.full((3, 2, 3), 257, np.uint16), np.full((3, 2, 3), 1.0)),  # 16-bit, dark
        (np.full((3, 2, 3), 514, np.int32), np.full((3, 2, 3), 2.0)),  # integer > 255: 16-bit
        (np.full((3, 2, 3), 200, np.int64), np.full((3, 2, 3), 200.0)),  # integer <= 255: 8-bit
        (np.full((3, 2, 3), 0.5, np.float64), np.full((3, 2, 3), 127.5)),  # float in [0, 1]
        (np.full((3, 2, 3), 100.0, np.float32), np.full((3, 2, 3), 100.0)),  # 8-bit read as float
        (np.full((1, 2, 3), 65535.0, np.float32), np.full((3, 2, 3), 255.0)),  # 16-bit read as float
        (np.ones((1, 2, 3), bool), np.full((3, 2, 3), 255.0)),
    ],
)
def test_ensure_rgb_cases(arr, expected):
    out = EnsureRGBd(keys="image")({"image": arr})["image"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("as_float32", [False, True], ids=["file dtype", "float32 as LoadImaged gives"])
@pytest.mark.parametrize("channels, dtype, colour_max", [
    (4, np.uint8, 255), (2, np.uint8, 255), (4, np.uint16, 65535), (3, np.uint8, 255),
    (4, np.uint8, 1), (4, np.uint16, 200),  # dark colours: the full-scale alpha tells the scale
])
def test_ensure_rgb_matches_prepare(channels, dtype, colour_max, as_float32):
    """An image read directly gets the pixels that ``prepare`` would have written (one RGB rule, then rounding)."""
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, colour_max, (6, 5, channels), endpoint=True).astype(dtype)
    if channels in (2, 4):
        hwc[..., -1] = rng.integers(0, np.iinfo(dtype).max, (6, 5), endpoint=True)
        hwc[0, 0, -1] = np.iinfo(dtype).max  # an opaque pixel, as real images have
    prepared = to_rgb_uint8(hwc).astype(np.float32)
    chw = np.moveaxis(hwc, -1, 0)
    direct = EnsureRGBd(keys="image")({"image": chw.astype(np.float32) if as_float32 else chw})["image"]
    np.testing.assert_array_equal(np.round(np.moveaxis(direct, 0, -1)), prepared)


def test_ensure_rgb_returns_a_new_array():
    img = np.full((3, 2, 2), 100.0, np.float32)
    out = EnsureRGBd(keys="image")({"image": img})["image"]
    out -= 1  # as NormalizeIntensityd(channel_wise=True) does, in place
    assert (img == 100.0).all()


def test_ensure_rgb_keeps_type_and_meta():
    t = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3)
    out = EnsureRGBd(keys="image")({"image": t})["image"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (3, 2, 3)
    assert torch.equal(out[2], t[0].float())
    m = MetaTensor(torch.rand(4, 2, 3), meta={"filename_or_obj": "x.png"})
    out = EnsureRGBd(keys="image")({"image": m})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.png"
    alpha = m[3:].as_tensor()
    torch.testing.assert_close(out, m[:3].as_tensor() * 255 * alpha + 255 * (1 - alpha))


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((5, 4, 4), np.uint8), r"'image' has shape \(5, 4, 4\)"),
        (np.zeros((4, 4), np.uint8), r"'image' has shape \(4, 4\)"),
        (np.full((3, 4, 4), -1.0), r"'image' with shape \(3, 4, 4\) has values"),
        (np.full((3, 4, 4), 70000, np.int32), r"'image' with shape \(3, 4, 4\) has values"),
        (np.full((3, 4, 4), np.nan), r"'image' with shape \(3, 4, 4\) has values"),
    ],
)
def test_ensure_rgb_errors(arr, match):
    with pytest.raises(ValueError, match=match):
        EnsureRGBd(keys="image")({"image": arr})


def test_ensure_rgb_allow_missing_keys():
    assert EnsureRGBd(keys="image", allow_missing_keys=True)({"label": 1}) == {"label": 1}
    with pytest.raises(KeyError):
        EnsureRGBd(keys="image")({"label": 1})


def test_normalize_intensity_is_sam_normalisation():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(3, 6, 9)).astype(np.float32)
    norm = NormalizeIntensityd(keys="image", subtrahend=SAM_MEAN, divisor=SAM_STD, channel_wise=True)
    out = norm({"image": img.copy()})["image"]  # NormalizeIntensity(channel_wise=True) works in place
    expected = (img - np.array(SAM_MEAN)[:, None, None]) / np.array(SAM_STD)[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# CenterNeighborhoodPointSampled
# ----------------------------------------------------------------------------------------------------------
def test_nucleus_center_matches_brute_force():
    lab = make_label()[0]
    for i in np.unique(lab)[1:]:
        assert nucleus_center(lab == i) == brute_force_center(lab == i), i


def test_center_mode_clicks_inside_nucleus_near_center_and_background():
    lab = make_label()
    centers = {int(i): brute_force_center(lab[0] == i) for i in np.unique(lab)[1:]}
    t = CenterNeighborhoodPointSampled(kernel_radius=K)
    t.set_random_state(0)
    results = draws(t, {"label": lab}, 1500)
    for (fx, fy), (bx, by), inst in results:
        assert lab[0, fy, fx] == inst  # inside the chosen nucleus
        cx, cy = centers[inst]
        assert max(abs(fx - cx), abs(fy - cy)) <= K  # Chebyshev distance to the L1 centre
        assert lab[0, by, bx] == 0  # negative click on background
    assert {r[2] for r in results} == set(centers)  # every nucleus gets chosen
    assert len({r[0] for r in results if r[2] == 3}) > 1  # the neighbourhood, not a fixed point


def test_kernel_radius_zero_gives_exact_center():
    lab = make_label()
    t = CenterNeighborhoodPointSampled(kernel_radius=0)
    t.set_random_state(1)
    for (fx, fy), _, inst in draws(t, {"label": lab}, 200):
        assert (fx, fy) == brute_force_center(lab[0] == inst)


def test_gaussian_weights():
    yy, xx = np.mgrid[:32, :32]
    lab = (((yy - 15) ** 2 + (xx - 16) ** 2) <= 100).astype(np.int32)[None] * 2  # one big disc, id 2
    cx, cy = brute_force_center(lab[0] == 2)
    t = CenterNeighborhoodPointSampled(kernel_radius=2, sigma=1.0)
    t.set_random_state(3)
    n = 3000
    counts = np.zeros((5, 5))
    for (fx, fy), _, _ in draws(t, {"label": lab}, n):
        counts[fy - cy + 2, fx - cx + 2] += 1
    g = np.exp(-(np.arange(-2, 3)[:, None] ** 2 + np.arange(-2, 3)[None, :] ** 2) / 2.0)
    g /= g.sum()
    assert 0.5 * np.abs(counts / n - g).sum() < 0.04  # total variation distance


def test_fresh_draws_and_reproducibility():
    lab = make_label()
    t = CenterNeighborhoodPointSampled()
    t.set_random_state(42)
    first = draws(t, {"label": lab}, 30)
    assert len(set(first)) > 1  # successive calls differ
    t.set_random_state(42)
    assert draws(t, {"label": lab}, 30) == first
    try:
        set_determinism(seed=123)
        a = draws(CenterNeighborhoodPointSampled(), {"label": lab}, 30)
        set_determinism(seed=123)
        b = draws(CenterNeighborhoodPointSampled(), {"label": lab}, 30)
    finally:
        set_determinism(seed=None)
    assert a == b and len(set(a)) > 1


def test_random_mode_covers_nucleus_more_widely():
    lab = make_label()
    only3 = np.where(lab == 3, 3, 0)
    center = brute_force_center(only3[0] == 3)
    spread = {}
    for mode in ("center", "random"):
        t = CenterNeighborhoodPointSampled(mode=mode)
        t.set_random_state(5)
        pts = [r[0] for r in draws(t, {"label": only3}, 400)]
        assert all(only3[0, y, x] == 3 for x, y in pts)
        spread[mode] = (len(set(pts)), max(max(abs(x - center[0]), abs(y - center[1])) for x, y in pts))
    assert spread["center"][1] <= K < spread["random"][1]
    assert spread["random"][0] > 2 * spread["center"][0]


def test_empty_and_full_labels():
    t = CenterNeighborhoodPointSampled()
    d = t({"label": np.zeros((1, 6, 9), np.int32)})
    assert d["foreground"] == [] and d["prompt_instance"] == 0
    assert len(d["background"]) == 1 and 0 <= d["background"][0][0] < 9 and 0 <= d["background"][0][1] < 6
    d = t({"label": np.full((1, 6, 9), 4, np.int32)})
    assert d["background"] == [] and d["prompt_instance"] == 4
    x, y = d["foreground"][0]
    cx, cy = brute_force_center(np.ones((6, 9), bool))
    assert (cx, cy) == (2, 2)  # the first of the tied maxima in scan order
    assert max(abs(x - cx), abs(y - cy)) <= K


@pytest.mark.parametrize("value, dtype", [(1, np.uint8), (255, np.uint8), (True, bool), (1.0, np.float32)])
def test_binary_label_uses_connected_components(value, dtype):
    lab = make_label()[0]
    binary = np.where(lab > 0, value, 0).astype(dtype)[None]
    t = CenterNeighborhoodPointSampled()
    t.set_random_state(9)
    results = draws(t, {"label": binary}, 300)
    for (fx, fy), (bx, by), inst in results:
        assert binary[0, fy, fx] and not binary[0, by, bx] and inst >= 1
    # 9 nuclei; 8 and 9 touch, and 12 lies inside 21's block, so the binary mask has 7 components
    assert len(np.unique(lab)) - 1 == 9 and {r[2] for r in results} == set(range(1, 8))


def test_label_as_metatensor_and_2d():
    lab = make_label()
    t = CenterNeighborhoodPointSampled()
    for label in (MetaTensor(torch.as_tensor(lab, dtype=torch.float32)), lab[0]):
        d = t({"label": label})
        x, y = d["foreground"][0]
        assert lab[0, y, x] == d["prompt_instance"]


def test_sampler_argument_and_key_errors():
    for kwargs in ({"kernel_radius": -1}, {"kernel_radius": 1.5}, {"sigma": 0}, {"mode": "centre"}):
        with pytest.raises(ValueError):
            CenterNeighborhoodPointSampled(**kwargs)
    with pytest.raises(ValueError, match=r"'label' has shape \(2, 4, 4\)"):
        CenterNeighborhoodPointSampled()({"label": np.zeros((2, 4, 4))})
    assert CenterNeighborhoodPointSampled(allow_missing_keys=True)({"image": 0}) == {"image": 0}
    with pytest.raises(KeyError):
        CenterNeighborhoodPointSampled()({"image": 0})


# ----------------------------------------------------------------------------------------------------------
# AddClickGuidanceChannelsd
# ----------------------------------------------------------------------------------------------------------
def test_click_maps_orientation_non_square():
    img = np.zeros((3, 5, 8), np.float32)  # H = 5 rows, W = 8 columns
    d = AddClickGuidanceChannelsd()({"image": img, "foreground": [[6, 1]], "background": [[0, 4]]})
    out = d["image"]
    assert out.shape == (5, 5, 8) and out.dtype == np.float32
    assert out[3, 1, 6] == 1.0 and out[3].sum() == 1.0  # positive map: [row=y, col=x]
    assert out[4, 4, 0] == 1.0 and out[4].sum() == 1.0
    np.testing.assert_array_equal(out[:3], img)
    # what the network does: the argmax of the map, read back as (x, y)
    row, col = np.unravel_index(np.argmax(out[3]), out[3].shape)
    assert (col, row) == (6, 1)


@pytest.mark.parametrize(
    "img",
    [
        torch.zeros(3, 4, 7, dtype=torch.float64),
        MetaTensor(torch.zeros(3, 4, 7), meta={"filename_or_obj": "a.png"}),
        np.zeros((3, 4, 7), np.float16),
    ],
)
def test_click_maps_keep_type_and_dtype(img):
    out = AddClickGuidanceChannelsd()({"image": img, "foreground": [[2.6, 0.4]], "background": []})["image"]
    assert type(out) is type(img) and out.dtype == img.dtype and tuple(out.shape) == (5, 4, 7)
    assert out[3, 0, 3] == 1 and float(out[3].sum()) == 1.0  # float clicks rounded
    assert float(out[4].sum()) == 0.0  # empty list: no click
    if isinstance(img, MetaTensor):
        assert out.meta["filename_or_obj"] == "a.png"


def test_click_maps_missing_click_keys_and_numpy_clicks():
    out = AddClickGuidanceChannelsd()({"image": np.zeros((3, 4, 4))})["image"]
    assert out.shape == (5, 4, 4) and out[3:].sum() == 0
    out = AddClickGuidanceChannelsd()({"image": np.zeros((3, 4, 4)), "foreground": np.array([[1, 2], [3, 0]])})
    assert out["image"][3, 2, 1] == 1 and out["image"][3, 0, 3] == 1


def test_click_outside_image_raises_one_line():
    t = AddClickGuidanceChannelsd()
    with pytest.raises(ValueError) as err:
        t({"image": np.zeros((3, 5, 8)), "foreground": [[5, 5]], "background": []})  # y = 5 is row 6 of 5
    msg = str(err.value)
    assert "\n" not in msg and "click [5, 5] is outside" in msg and "8x5" in msg
    with pytest.raises(ValueError, match=r"click \[-1, 0\]"):
        t({"image": np.zeros((3, 5, 8)), "background": [[-1, 0]]})
    with pytest.raises(ValueError, match=r"list of \[x, y\] pairs"):
        t({"image": np.zeros((3, 5, 8)), "foreground": [1, 2]})


# ----------------------------------------------------------------------------------------------------------
# End to end: loading, spatial augmentation, sampling, guidance
# ----------------------------------------------------------------------------------------------------------
def test_end_to_end_png_orientation(tmp_path):
    h, w = 24, 40
    lab = np.zeros((h, w), np.uint16)
    lab[3:8, 28:36] = 1000  # a nucleus in the top right: a transposed reading would miss it
    img = np.full((h, w, 3), 220, np.uint8)
    img[lab > 0] = [80, 40, 120]
    Image.fromarray(img).save(tmp_path / "img.png")
    Image.fromarray(lab).save(tmp_path / "lab.png")
    pipeline = Compose([
        LoadImaged(keys=["image", "label"], reader="PILReader", reverse_indexing=False, ensure_channel_first=True),
        EnsureRGBd(keys="image"),
        CenterNeighborhoodPointSampled(),
        NormalizeIntensityd(keys="image", subtrahend=SAM_MEAN, divisor=SAM_STD, channel_wise=True),
        AddClickGuidanceChannelsd(keys="image"),
    ])
    pipeline.set_random_state(0)
    for _ in range(20):
        d = pipeline({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "lab.png")})
        x, y = d["foreground"][0]
        assert d["prompt_instance"] == 1000 and 28 <= x < 36 and 3 <= y < 8
        assert tuple(d["image"].shape) == (5, h, w)
        pos = d["image"][3]
        assert pos[y, x] == 1 and float(pos.sum()) == 1
        bx, by = d["background"][0]
        assert lab[by, bx] == 0 and d["image"][4, by, bx] == 1
        # the click pixel carries the nucleus colour in the normalised image
        np.testing.assert_allclose(d["image"][:3, y, x], (np.array([80, 40, 120]) - SAM_MEAN) / SAM_STD, rtol=1e-5)


def test_clicks_stay_correct_through_spatial_augmentation():
    lab = make_label().astype(np.float32)
    img = np.random.default_rng(0).uniform(0, 255, (3,) + lab.shape[1:]).astype(np.float32)
    keys = ["image", "label"]
    aug = Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5),
        RandRotated(keys, range_x=np.pi, prob=0.8, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandSpatialCropd(keys, roi_size=(30, 36), random_size=False),
        Resized(keys, spatial_size=(45, 60), mode=("bilinear", "nearest")),
        CenterNeighborhoodPointSampled(),
        AddClickGuidanceChannelsd(keys="image"),
    ])
    aug.set_random_state(2024)
    ids = set(np.unique(lab)[1:].astype(int))
    n_positive = 0
    for _ in range(150):
        d = aug({"image": img, "label": lab})
        out_lab = np.asarray(d["label"])[0]
        assert out_lab.shape == (45, 60) and set(np.unique(out_lab).astype(int)) <= ids | {0}
        if d["foreground"]:
            x, y = d["foreground"][0]
            assert out_lab[y, x] > 0 and out_lab[y, x] == d["prompt_instance"]  # no id is 1 or 255: never binary
            assert d["image"][3, y, x] == 1 and float(d["image"][3].sum()) == 1
            n_positive += 1
        bx, by = d["background"][0]
        assert out_lab[by, bx] == 0 and d["image"][4, by, bx] == 1
    assert n_positive > 100

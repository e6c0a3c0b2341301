"""The one click rule (sppnet_monai.clicks), applied identically by every path that takes clicks."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from sppnet_monai.clicks import click_pixels, first_in_scan_order
from sppnet_monai.networks import SPPNet
from sppnet_monai.transforms import AddClickGuidanceChannelsd
from sppnet_monai.utils import SPPNetError
from sppnet_monai.workflows.datasets import image_entry

WIDTH, HEIGHT = 8, 5
INSIDE = [[-0.5, -0.5], [7.49, 4.49], [0, 0], [7, 4]]
OUTSIDE = [[-0.51, 0], [7.5, 0], [0, 4.5], [0, -0.6]]


def test_click_is_on_the_pixel_whose_centre_is_nearest():
    pixels = click_pixels([[-0.5, 0.49], [2.5, 3.5], [7.49, 4.49]], WIDTH, HEIGHT)
    assert pixels.tolist() == [[0, 0], [3, 4], [7, 4]]  # x.5 goes to the next pixel: floor(x + 0.5)


@pytest.mark.parametrize("click", OUTSIDE)
def test_click_outside_is_one_line_error(click):
    with pytest.raises(SPPNetError) as err:
        click_pixels([click], WIDTH, HEIGHT, "foreground", "a.png")
    message = str(err.value)
    assert "\n" not in message and "outside a.png (8x5" in message and "foreground click" in message


def test_malformed_clicks():
    for bad in ([1, 2], [[1, 2, 3]], [[np.nan, 1]], "x", [[10**400, 1]]):
        with pytest.raises(SPPNetError, match=r"\[x, y\] pairs"):
            click_pixels(bad, WIDTH, HEIGHT)


def test_first_in_scan_order_is_top_row_then_left():
    assert first_in_scan_order(np.array([[5, 3], [7, 1], [2, 1]])).tolist() == [[2, 1]]


def _image_file(tmp_path) -> str:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("click, inside", [(c, True) for c in INSIDE] + [(c, False) for c in OUTSIDE])
def test_every_path_agrees_on_inside_and_outside(tmp_path, click, inside):
    """Clicks file entries, the click-channel transform and the network's explicit points use one bound."""
    image = _image_file(tmp_path)
    net = SPPNet(image_size=64).eval()
    features = net.encode(torch.zeros(1, 3, HEIGHT, WIDTH))
    paths = {
        "clicks file": lambda: image_entry(image, {"a.png": {"foreground": [click]}}),
        "transform": lambda: AddClickGuidanceChannelsd()({"image": np.zeros((3, HEIGHT, WIDTH)), "foreground": [click]}),
        "network": lambda: net.decode(features, torch.tensor([[click]], dtype=torch.float32), torch.tensor([[1]])),
    }
    for name, call in paths.items():
        if inside:
            call()
        else:
            with pytest.raises(SPPNetError, match="outside"):
                call()

"""AutoClickd: clicks chosen from the image alone, for inference without user clicks."""

import numpy as np

from sppnet_monai.transforms import AutoClickd


def _pink_with_purple_disks(height=48, width=64):
    """(3, H, W) 0-255: pink stroma with a large purple nucleus at (x=40, y=20) and a small one at (x=8, y=40)."""
    rows, cols = np.mgrid[:height, :width]
    image = np.empty((3, height, width), np.float32)
    image[:] = np.array([235, 170, 200], np.float32)[:, None, None]
    for (cx, cy), radius in (((40, 20), 9), ((8, 40), 3)):
        image[:, (cols - cx) ** 2 + (rows - cy) ** 2 <= radius**2] = np.array([90, 50, 150], np.float32)[:, None]
    return image, rows, cols


def test_positive_in_the_largest_nucleus_and_negative_far_from_nuclei():
    image, rows, cols = _pink_with_purple_disks()
    d = AutoClickd()({"image": image})
    (px, py), (nx, ny) = d["foreground"][0], d["background"][0]
    assert abs(px - 40) <= 1 and abs(py - 20) <= 1
    nuclei = ((cols - 40) ** 2 + (rows - 20) ** 2 <= 81) | ((cols - 8) ** 2 + (rows - 40) ** 2 <= 9)
    assert not nuclei[ny, nx]
    distance_to_large = np.hypot(nx - 40, ny - 20)
    assert distance_to_large > 15


def test_given_clicks_are_kept_and_only_missing_ones_filled():
    image, _, _ = _pink_with_purple_disks()
    d = AutoClickd()({"image": image, "foreground": [[8, 40]]})
    assert d["foreground"] == [[8, 40]]
    assert len(d["background"]) == 1
    both = {"image": image, "foreground": [[1, 2]], "background": [[3, 4]]}
    assert AutoClickd()(both) == both


def test_uniform_image_gives_no_positive_click():
    d = AutoClickd()({"image": np.full((3, 16, 16), 200.0, np.float32)})
    assert d["foreground"] == [] and len(d["background"]) == 1

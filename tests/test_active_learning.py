"""Which patch to label next (sppnet_monai.active_learning) and the app engine's side of it: tissue, labelled
areas, entropy; and the engine's clicks-first gate, region progress and cancellation (no MONAI Label needed)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet_monai.active_learning import candidate_patches, centre_window, least_sure, mean_entropy, overlap_fraction, tissue_mask

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))

from lib.engine import ClicksFirst, ClickSegmenter, RegionCancelled  # noqa: E402
from test_engine import _bundle_folder  # noqa: E402


def test_tissue_mask_tells_stained_tissue_from_glass():
    rgb = np.full((4, 6, 3), 242, np.uint8)  # glass
    rgb[:, :3] = (200, 120, 180)  # eosin-pink tissue
    rgb[0, 0] = (60, 30, 120)  # a nucleus
    assert tissue_mask(rgb)[:, :3].all() and not tissue_mask(rgb)[:, 3:].any()
    assert np.array_equal(tissue_mask(np.moveaxis(rgb, -1, 0)), tissue_mask(rgb))  # (3, H, W) too


def test_candidates_are_tissue_cells_of_the_grid_never_labelled():
    tissue = np.zeros((300, 500), bool)
    tissue[:, :250] = True  # the left half is tissue
    share = lambda box: float(tissue[box[1] : box[1] + box[3], box[0] : box[0] + box[2]].mean())  # noqa: E731
    cells = candidate_patches((500, 300), (100, 100), share)
    assert (0, 0, 100, 100) in cells and (200, 0, 100, 100) in cells  # half tissue counts (MIN_TISSUE 0.5)
    assert all(x + 100 <= 300 for x, _, _, _ in cells) and len(cells) == 9  # x 0, 100, 200; y 0, 100, 200
    labelled = [(0, 0, 150, 100)]
    left = candidate_patches((500, 300), (100, 100), share, labelled)
    assert (0, 0, 100, 100) not in left and (100, 0, 100, 100) not in left and len(left) == 7
    assert all(overlap_fraction(c, labelled[0]) <= 0.1 for c in left)
    # A patch larger than the image is the image; the last cell lies flush with the border.
    assert candidate_patches((500, 300), (1024, 1024), lambda box: 1.0) == [(0, 0, 500, 300)]
    assert candidate_patches((250, 100), (100, 100), lambda box: 1.0)[-1] == (150, 0, 100, 100)
    with pytest.raises(ValueError, match="patch_size must be positive"):
        candidate_patches((500, 300), (0, 100), share)


def test_entropy_and_least_sure():
    assert mean_entropy(torch.full((4, 4), 0.5)) == pytest.approx(1.0)
    assert mean_entropy(np.array([[0.0, 1.0]])) < 1e-3
    box, scores = least_sure([(0, 0, 1, 1), (1, 0, 1, 1)], lambda b: [0.2, 0.7][b[0]])
    assert box == (1, 0, 1, 1) and scores == [0.2, 0.7]
    assert centre_window((900, 0, 100, 100), 256, (1000, 800)) == (744, 0, 256, 256)  # moved inside the image


def test_clicks_go_before_the_next_step_of_a_region():
    gate, order = ClicksFirst(), []
    step_started = threading.Event()

    def region():
        for index in range(3):
            with gate.step():
                order.append(f"tile{index}")
                step_started.set()
                time.sleep(0.2)

    worker = threading.Thread(target=region)
    worker.start()
    step_started.wait()
    with gate.click():  # waits for tile0 only, then goes before tile1
        order.append("click")
    worker.join()
    assert order == ["tile0", "click", "tile1", "tile2"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ClickSegmenter:
    return ClickSegmenter(_bundle_folder(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("images") / "big.png"
    Image.fromarray(rng.integers(90, 240, (256, 320, 3), dtype=np.uint8)).save(path)
    return path


def test_region_progress_and_cancel(engine, big_image, monkeypatch):
    seen = []
    real = engine._region_steps

    def spy(name, tiles, area, tile_size, cancelled):
        def slow():
            for tile in tiles:
                seen.append(dict(next(iter(engine.regions.values()))))
                if len(seen) == 2:
                    engine.cancel_regions()
                yield tile

        return real(name, slow(), area, tile_size, cancelled)

    monkeypatch.setattr(engine, "_region_steps", spy)
    engine._model()
    monkeypatch.setattr(engine._segmenter, "tile_size", 64)
    with pytest.raises(RegionCancelled, match="cancelled after 2 of 20 tiles"):
        engine.segment_region(big_image, None)
    assert seen[0]["tiles"] == 20 and seen[0]["image"] == "big.png" and seen[1]["done"] == 1
    assert engine.regions == {}  # progress entries go with their request
    monkeypatch.undo()
    records, info = engine.segment_region(big_image, (0, 0, 128, 128))  # the next region runs to its end
    assert info["mode"] == "automatic"
    # A request cut into regions (MONAI Label's WSI tiles) stops at its next region once cancelled.
    began = engine.cancel_count
    engine.cancel_regions()
    with pytest.raises(RegionCancelled):
        engine.segment_region(big_image, (0, 0, 128, 128), cancel_count=began)


def test_window_entropy_is_a_mean_entropy_in_bits(engine, big_image):
    value = engine.window_entropy(big_image, (0, 0, 64, 64))
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(engine.window_entropy(big_image, (0, 0, 64, 64)))

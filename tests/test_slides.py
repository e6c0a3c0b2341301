"""Whole-slide images: OpenSlide reading, tile-wise segmentation (each nucleus once and whole), GeoJSON/CSV,
resumable ``predict`` on slides, its one-line errors, ``torchrun`` sharding, and the app engine's WSI tiles.

The slide is a generated pyramidal tiled TIFF (tifffile, deflate tiles, 2 levels, 0.25 um/px) with
haematoxylin disks at known positions; the network is the bundle's shipped model.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from PIL import Image

from sppnet_monai.data.slides import Slide
from sppnet_monai.data.synthetic import nuclei_slide_tile, write_nuclei_slide
from sppnet_monai.inferers import PromptedSlidingWindowInferer, WindowLogitCache, window_grid
from sppnet_monai.networks import SPPNet
from sppnet_monai.predict import Predictor, run_predict
from sppnet_monai.slide_inference import SlideSegmenter
from sppnet_monai.utils import SPPNetError

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, RADIUS = 512, 384, 9.0
BORDER_NUCLEUS = (256.0, 200.0)  # on the border of the 256-pixel tiles (x = 256)


def _centres() -> np.ndarray:
    rng = np.random.default_rng(1)
    xs, ys = np.meshgrid(np.arange(40, WIDTH - 30, 56), np.arange(40, HEIGHT - 30, 56))
    centres = np.stack([xs.ravel(), ys.ravel()], 1) + rng.uniform(-6, 6, (xs.size, 2))
    centres = centres[np.hypot(*(centres - BORDER_NUCLEUS).T) > 3 * RADIUS]
    return np.vstack([centres, BORDER_NUCLEUS])


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    write_nuclei_slide(path, WIDTH, HEIGHT, _centres(), radius=RADIUS, levels=2, tile=128, mpp=0.25)
    return path


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


def _matched(records, centres, tolerance=3.0) -> np.ndarray:
    """For each centre, how many records have their centroid within ``tolerance`` pixels."""
    found = np.array([r["centroid"] for r in records]).reshape(-1, 2)
    return (np.hypot(*(found[None] - centres[:, None]).transpose(2, 0, 1)) < tolerance).sum(1)


def test_slide_reads_levels_regions_and_pixel_size(slide_path):
    with Slide(slide_path) as slide:
        assert slide.is_slide and slide.level_count == 2 and slide.mpp == (0.25, 0.25)
        assert slide.size(0) == (WIDTH, HEIGHT) and slide.size(1) == (WIDTH // 2, HEIGHT // 2)
        expected = nuclei_slide_tile((0, 0), (HEIGHT, WIDTH), _centres(), RADIUS)
        np.testing.assert_array_equal(slide.read(100, 50, 70, 40, 0), np.moveaxis(expected[50:90, 100:170], -1, 0))
        np.testing.assert_array_equal(slide.read(10, 20, 30, 30, 1), np.moveaxis(expected[::2, ::2][20:50, 10:40], -1, 0))
        with pytest.raises(SPPNetError, match="levels 0..1, not level 2"):
            slide.check_level(2)
        with pytest.raises(SPPNetError, match="not inside slide.tif"):
            slide.check_region((600, 0, 100, 10))


def test_plain_images_and_corrupt_slides(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "plain.png")
    with Slide(tmp_path / "plain.png") as slide:
        assert not slide.is_slide and slide.size(0) == (30, 20) and slide.read(5, 5, 4, 3).shape == (3, 3, 4)
    (tmp_path / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(SPPNetError, match="broken.svs"):
        Slide(tmp_path / "broken.svs")


def test_every_nucleus_once_and_whole_whatever_the_tiles(slide_path, predictor):
    centres = _centres()
    with Slide(slide_path) as slide:
        results = {size: [n for _, _, ns in SlideSegmenter(predictor, size, 64).segment_region(slide) for n in ns] for size in (256, 512)}
    for records in results.values():
        assert (_matched(records, centres) == 1).all()  # each known nucleus found exactly once
        assert len(records) == len(centres)
    # The tiles see the same pixels with the same windows: identical nuclei, whatever the tile size.
    key = lambda r: tuple(r["centroid"])  # noqa: E731
    assert sorted(map(key, results[256])) == sorted(map(key, results[512]))
    border = min(results[256], key=lambda r: np.hypot(*(np.array(r["centroid"]) - BORDER_NUCLEUS)))
    assert border["area"] > 0.9 * np.median([r["area"] for r in results[256]])  # whole, not cut at the tile border
    xs = [x for x, _ in border["contour"]]
    assert min(xs) < 256 - RADIUS / 2 and max(xs) > 256 + RADIUS / 2


def test_tiles_reuse_the_windows_they_share_with_the_same_result(slide_path, predictor):
    """The window cache: each window of the level's grid runs once, and the nuclei are those without the cache."""
    results, caches = {}, {}
    for mib in (0, 64):
        segmenter = SlideSegmenter(predictor, 256, 64, window_cache_mib=mib)
        with Slide(slide_path) as slide:
            results[mib] = [n for _, _, ns in segmenter.segment_region(slide) for n in ns]
        caches[mib] = segmenter.window_cache
    assert results[64] == results[0]
    grid = len(window_grid((HEIGHT, WIDTH), (256, 256), predictor.inferer.overlap))
    assert caches[64].misses == grid and caches[64].hits > 0  # the 6 tiles meet the grid's windows more than once each
    assert caches[0].hits == caches[0].misses == 0 and len(caches[0]) == 0
    # A cache smaller than the tiles' windows keeps within its size, and still gives the same nuclei.
    window_bytes = 256 * 256 * 4  # one float32 logit channel of a 256 window (the shipped model)
    small = SlideSegmenter(predictor, 256, 64, window_cache_mib=3 * window_bytes / 2**20)
    with Slide(slide_path) as slide:
        assert [n for _, _, ns in small.segment_region(slide) for n in ns] == results[0]
    assert len(small.window_cache) <= 3 and small.window_cache.nbytes <= 3 * window_bytes and small.window_cache.misses > grid
    with pytest.raises(SPPNetError, match="window_cache_mib"):
        WindowLogitCache(-1)


def test_window_cache_belongs_to_one_network_and_stays_out_of_gradients():
    torch.manual_seed(0)
    first, second = SPPNet(image_size=64).eval(), SPPNet(image_size=64).eval()
    image = torch.zeros(1, 5, 64, 64)
    image[:, :3] = torch.randn(1, 3, 64, 64)
    image[0, 3, 30, 30] = 1.0
    inferer, cache = PromptedSlidingWindowInferer(roi_size=(64, 64)), WindowLogitCache(8)
    with torch.no_grad():
        a = inferer(image, first, window_cache=cache)
        assert torch.equal(inferer(image, first, window_cache=cache), a) and cache.hits == 1
        b = inferer(image, second, window_cache=cache)  # another network: its own logits, not the first one's
        assert torch.equal(b, inferer(image, second)) and not torch.equal(a, b) and len(cache) == 1
    with torch.enable_grad():
        out = inferer(image, second, window_cache=cache)
    assert out.requires_grad and cache.misses == 2 and not any(t.requires_grad for t in cache._logits.values())


def test_predict_slide_writes_qupath_geojson_and_csv_and_resumes(slide_path, predictor, tmp_path, monkeypatch):
    summary = run_predict(str(slide_path), str(tmp_path / "a"), formats="geojson", region="0,0,512,384", tile_size=256)
    result = summary["images"][str(slide_path)]
    collection = json.loads((tmp_path / "a" / "slide_nuclei.geojson").read_text())
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == result["nuclei"] == len(_centres())
    for feature in features:
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid and polygon.area > 100
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        assert props["measurements"]["Area µm^2"] == pytest.approx(props["measurements"]["Area px^2"] * 0.0625, abs=0.01)
    rows = list(csv.DictReader(open(tmp_path / "a" / "slide_nuclei.csv")))
    assert len(rows) == len(features) and float(rows[0]["centroid_x_um"]) == pytest.approx(float(rows[0]["centroid_x_px"]) / 4, abs=0.01)
    assert summary["throughput"]["megapixels_per_second"] > 0 and summary["throughput"]["nuclei_per_second"] > 0
    assert not list((tmp_path / "a").glob(".*"))  # no partial file left

    # Stopped after two tiles (of 4): nothing is written but the partial file; the rerun resumes there.
    calls = {"n": 0}
    original = SlideSegmenter.segment_tile

    def stop_after_two(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SlideSegmenter, "segment_tile", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_predict(str(slide_path), str(tmp_path / "b"), formats="geojson", tile_size=256)
    assert not (tmp_path / "b" / "slide_nuclei.geojson").exists()
    monkeypatch.setattr(SlideSegmenter, "segment_tile", original)
    resumed = run_predict(str(slide_path), str(tmp_path / "b"), formats="geojson", tile_size=256)["images"][str(slide_path)]
    assert resumed["resumed_tiles"] == 2 and resumed["tiles"] == 4
    assert (tmp_path / "b" / "slide_nuclei.csv").read_text() == (tmp_path / "a" / "slide_nuclei.csv").read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"region": "500,0,100,10"}, "not inside slide.tif"),
        ({"level": 5}, "levels 0..1, not level 5"),
        ({"formats": "png"}, "written as --formats geojson"),
        ({"clicks": "CLICKS"}, "foreground click [600, 5] is outside the region"),
        ({"tile_size": 8}, "tile_size must be an integer from 32"),
    ],
)
def test_predict_slide_bad_input_names_the_value_and_writes_nothing(slide_path, tmp_path, kwargs, message):
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"slide.tif": {"foreground": [[600, 5]]}}))
    kwargs = {"formats": "geojson", **{k: str(clicks) if v == "CLICKS" else v for k, v in kwargs.items()}}
    out = tmp_path / "out"
    with pytest.raises(SPPNetError) as raised:
        run_predict(str(slide_path), str(out), **kwargs)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists() or not any(p.suffix in (".geojson", ".csv") for p in out.iterdir())


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "notes.svs").write_text("not a slide")  # neither a slide nor an image
    run = subprocess.run(
        [sys.executable, "-m", "sppnet_monai", "predict", str(tmp_path / "notes.svs"), str(tmp_path / "out"), "--formats", "geojson"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert run.returncode == 2 and "notes.svs" in run.stderr.strip().splitlines()[-1] and "Traceback" not in run.stderr


def test_torchrun_shards_the_inputs_and_gives_the_single_process_output(slide_path, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, origin in (("a", (0, 0)), ("b", (200, 100)), ("c", (300, 250))):
        Image.fromarray(nuclei_slide_tile(origin, (200, 240), _centres(), RADIUS)).save(inputs / f"{name}.png")
    single = tmp_path / "single"
    run_predict(str(inputs), str(single), formats=["png", "geojson"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sppnet_monai", "predict",
         str(inputs), str(tmp_path / "sharded"), "--formats", "png,geojson"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    assert report["ranks"] == 2 and len(report["images"]) == 3
    for path in sorted(single.iterdir()):
        assert (tmp_path / "sharded" / path.name).read_bytes() == path.read_bytes(), path.name


def test_app_engine_serves_wsi_tiles_clicks_from_the_cached_window_and_rectangles_whole(slide_path, tmp_path):
    """The MONAI Label app's engine (no monailabel needed): a click tile answered from its window's cached
    embedding (keyed by slide, level and window), a rectangle with no click answered tile-wise."""
    sys.path.insert(0, str(REPO / "monailabel_app"))
    from lib.engine import ClickSegmenter

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "configs").symlink_to(REPO / "bundle" / "configs")
    (bundle / "weights").symlink_to(REPO / "bundle" / "weights")
    segmenter = ClickSegmenter(bundle)
    centres = _centres()
    click = centres[np.argmin(np.hypot(*(centres - (200, 180)).T))].round()
    tile = (int(click[0]) - 64, int(click[1]) - 64, 128, 128)  # QuPath's click tool: a 128 patch around the click
    first, info = segmenter.segment_region(slide_path, tile, 0, [click.tolist()], [])
    assert info["mode"] == "click" and not info["windows"][0]["embedding_cached"]
    again, info = segmenter.segment_region(slide_path, tile, 0, [(click + 3).tolist()], [])
    assert info["windows"][0]["embedding_cached"] and info["encoder_runs"] == 1
    _, info = segmenter.segment_region(slide_path, (tile[0], tile[1], 200, 200), 1, [click.tolist()], [])
    assert not info["windows"][0]["embedding_cached"]  # another level, another window
    inside = centres[(centres[:, 0] >= tile[0]) & (centres[:, 0] < tile[0] + 128) & (centres[:, 1] >= tile[1]) & (centres[:, 1] < tile[1] + 128)]
    assert len(first) == len(inside) and (_matched(first, inside) == 1).all()
    whole, info = segmenter.segment_region(slide_path, (0, 0, 0, 0), 0)  # zero size: the whole image, no click
    assert info["mode"] == "automatic" and len(whole) == len(centres) and (_matched(whole, centres) == 1).all()
    halves = [segmenter.segment_region(slide_path, (x, 0, 256, HEIGHT), 0)[0] for x in (0, 256)]
    assert sorted(tuple(r["centroid"]) for r in halves[0] + halves[1]) == sorted(tuple(r["centroid"]) for r in whole)

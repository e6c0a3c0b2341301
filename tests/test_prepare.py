"""Data preparation: MoNuSeg XML rasterisation, generic folders, the synthetic demo, the CLI.

All data is generated in ``tmp_path``: tiny tifs and XMLs in the real MoNuSeg schema.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.data import load_decathlon_datalist
from PIL import Image
from skimage import draw

from sppnet_monai.data import prepare_demo, prepare_folder, prepare_monuseg
from sppnet_monai.data.datalist import split_train_val
from sppnet_monai.data.image_io import to_rgb_uint8
from sppnet_monai.data.instances import instances_from_mask
from sppnet_monai.data.monuseg import Region, polygon_pixels, rasterise_regions
from sppnet_monai.data.synthetic import touching_pairs
from sppnet_monai.utils import SPPNetError

REPO = Path(__file__).resolve().parents[1]
SIZE = 48  # height = width of the generated MoNuSeg-like images

# Non-overlapping nuclei with vertices off the integer grid (no pixel centre on an edge), as (X, Y).
NUCLEI = [
    [(5.3, 4.7), (14.6, 6.2), (12.1, 15.8), (4.4, 13.3)],
    [(30.2, 5.1), (40.7, 8.4), (37.3, 16.9)],
    [(8.2, 30.3), (19.7, 29.6), (21.4, 41.2), (12.6, 44.1), (6.9, 38.8)],
]
TWO_VERTICES = [(25.0, 25.0), (30.0, 30.0)]
OUTSIDE = [(40.3, 40.2), (55.7, 41.1), (52.2, 53.9), (41.1, 47.8)]  # clipped at the image border


# --------------------------------------------------------------------------- builders


def region_xml(regions: list[list[tuple[float, float]]], microns_per_pixel: float = 0.2527) -> str:
    """A MoNuSeg/Aperio annotation XML with one Region per polygon of (X, Y) vertices."""
    body = "".join(
        f'<Region Id="{i + 1}" Type="0"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for i, vertices in enumerate(regions)
    )
    return (
        f'<Annotations MicronsPerPixel="{microns_per_pixel}"><Annotation Id="1"><Attributes/><Regions>'
        '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
        f"{body}</Regions><Plots/></Annotation></Annotations>"
    )


def he_image(seed: int, size: int = SIZE) -> np.ndarray:
    """``(size, size, 3)`` uint8 random pinkish image."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 60, (size, size, 3)) + np.array([190, 120, 170])).astype(np.uint8)


def polygon_mask(vertices: list[tuple[float, float]], shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """Independent reference: skimage's closed polygon (identical when no centre is on an edge)."""
    xs, ys = zip(*vertices)
    mask = np.zeros(shape, dtype=bool)
    mask[draw.polygon(ys, xs, shape)] = True
    return mask


def make_monuseg_tree(root: Path, image_dir: str = "Tissue Images") -> dict[str, int]:
    """A MoNuSeg-like training folder; returns the expected number of instances per image."""
    (root / image_dir).mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Binary_masks").mkdir()
    for i, name in enumerate(["img_a", "img_b", "img_c"]):
        tifffile.imwrite(root / image_dir / f"{name}.tif", he_image(i))
    # img_a: three clean nuclei; img_b: + one 2-vertex region and one crossing the border
    (root / "Annotations" / "img_a.xml").write_text(region_xml(NUCLEI))
    (root / "Annotations" / "img_b.xml").write_text(region_xml(NUCLEI[:2] + [TWO_VERTICES, OUTSIDE]))
    # img_c: no XML, a binary mask with two separate blobs -> connected components
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[5:15, 5:15] = 1
    mask[30:40, 20:35] = 1
    Image.fromarray(mask).save(root / "Binary_masks" / "img_c.png")
    return {"img_a": 3, "img_b": 3, "img_c": 2}


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def square(row: int, col: int, side: int) -> Region:
    """An axis-aligned square region with integer corners, Id ``sq<row>,<col>,<side>``."""
    rows = np.array([row, row, row + side, row + side], dtype=float)
    cols = np.array([col, col + side, col + side, col], dtype=float)
    return Region(f"sq{row},{col},{side}", rows=rows, cols=cols)


def warnings_about(summary: dict, needle: str) -> list[str]:
    return [w for w in summary["warnings"] if needle in w]


# --------------------------------------------------------------------------- rasterisation


def test_half_open_rule_counts_polygon_area():
    """Integer-corner squares get exactly their area; squares sharing an edge do not overlap."""
    labels, stats = rasterise_regions([square(10, 10, 10), square(10, 20, 10)], (32, 40))
    expected = np.zeros((32, 40), dtype=np.uint16)
    expected[10:20, 10:20], expected[10:20, 20:30] = 1, 2
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.uint16 and stats.overwritten == [] and stats.degenerate == []


def test_rasterise_overlap_degenerate_and_clipping():
    regions = [
        square(2, 2, 10),  # 1: partly overwritten by the next
        square(6, 6, 10),  # 2: overwrites 1 where they overlap
        square(20, 20, 2),  # fully covered by the next one -> overwritten
        square(19, 19, 5),
        Region("two", rows=np.array([1.0, 5.0]), cols=np.array([1.0, 5.0])),  # < 3 vertices
        Region("sliver", rows=np.array([3.1, 3.2, 3.3]), cols=np.array([1.1, 9.2, 1.3])),  # no pixel centre
        Region("nan", rows=np.array([1.0, np.nan, 5.0]), cols=np.array([1.0, 2.0, 5.0])),
        square(25, 25, 10),  # vertices outside the 30 x 30 image: clipped
    ]
    labels, stats = rasterise_regions(regions, (30, 30))
    assert stats.regions == 8
    assert [rid for rid, _ in stats.degenerate] == ["two", "sliver", "nan"]
    assert stats.overwritten == ["sq20,20,2"]
    assert stats.clipped == ["sq25,25,10"]
    assert int(labels.max()) == 4 and set(np.unique(labels).tolist()) == {0, 1, 2, 3, 4}
    assert (labels[6:16, 6:16] == 2).all() and (labels[2:6, 2:12] == 1).all()
    assert (labels[25:30, 25:30] == 4).all()


def test_polygon_pixels_match_reference_off_grid():
    for vertices in NUCLEI:
        xs, ys = (np.array(v) for v in zip(*vertices))
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[polygon_pixels(ys, xs, (SIZE, SIZE))] = True
        np.testing.assert_array_equal(mask, polygon_mask(vertices))


# --------------------------------------------------------------------------- MoNuSeg


def test_prepare_monuseg(tmp_path):
    expected = make_monuseg_tree(tmp_path / "src")
    dst = tmp_path / "dst"
    summary = prepare_monuseg(tmp_path / "src", dst, seed=0)
    json.dumps(summary)  # JSON-serialisable

    assert summary["counts"] == {"training": 2, "validation": 1}
    assert {name: info["num_instances"] for name, info in summary["images"].items()} == expected
    img_b = summary["images"]["img_b"]
    assert (img_b["regions"], img_b["degenerate_polygons"], img_b["clipped_polygons"]) == (4, 1, 1)
    assert img_b["num_instances"] == img_b["regions"] - img_b["degenerate_polygons"]
    assert summary["images"]["img_a"]["microns_per_pixel"] == pytest.approx(0.2527)
    assert summary["images"]["img_c"]["instances"] == "connected_components"
    assert summary["degenerate_polygons"] == 1
    assert warnings_about(summary, "img_b.xml: skipped 1 degenerate region(s) with fewer than 3 vertices")
    assert warnings_about(summary, "img_b.xml: 1 region(s) have vertices outside the 48x48 image")

    # labels follow the polygons in file order; images are the tifs as RGB uint8
    labels_a = read_png(dst / "labels" / "img_a.png")
    assert labels_a.dtype == np.uint16 and labels_a.shape == (SIZE, SIZE)
    for instance_id, vertices in enumerate(NUCLEI, start=1):
        np.testing.assert_array_equal(labels_a == instance_id, polygon_mask(vertices))
    labels_b = read_png(dst / "labels" / "img_b.png")
    np.testing.assert_array_equal(labels_b == 3, polygon_mask(OUTSIDE))
    np.testing.assert_array_equal(read_png(dst / "images" / "img_a.png"), he_image(0))
    labels_c = read_png(dst / "labels" / "img_c.png")
    assert set(np.unique(labels_c[5:15, 5:15])) | set(np.unique(labels_c[30:40, 20:35])) == {1, 2}

    # the datalist loads with MONAI and every entry has the same keys
    for key, count in (("training", 2), ("validation", 1)):
        items = load_decathlon_datalist(dst / "datalist.json", data_list_key=key, base_dir=dst)
        assert len(items) == count
        for item in items:
            assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
            assert set(item) == {"image", "label", "name", "instances", "num_instances"}
    assert "test" not in json.loads((dst / "datalist.json").read_text())
    assert not [p for p in dst.rglob("*") if ".tmp" in p.name]  # atomic writes left nothing behind


def test_prepare_monuseg_with_test_folder(tmp_path):
    make_monuseg_tree(tmp_path / "train", image_dir="Tissue_Images")
    test_src = tmp_path / "test"  # test zip: tif and XML side by side
    test_src.mkdir()
    tifffile.imwrite(test_src / "img_t.tif", he_image(7))
    (test_src / "img_t.xml").write_text(region_xml(NUCLEI[1:]))
    summary = prepare_monuseg(tmp_path / "train", tmp_path / "dst", test_src=test_src)
    assert summary["counts"] == {"training": 2, "validation": 1, "test": 1}
    items = load_decathlon_datalist(tmp_path / "dst" / "datalist.json", data_list_key="test", base_dir=tmp_path / "dst")
    assert [item["name"] for item in items] == ["img_t"] and items[0]["num_instances"] == 2


def test_bad_inputs_are_reported_and_the_rest_prepared(tmp_path, caplog):
    src = tmp_path / "src"
    make_monuseg_tree(src)
    images, annotations, masks = src / "Tissue Images", src / "Annotations", src / "Binary_masks"
    tifffile.imwrite(images / "no_annotation.tif", he_image(3))
    tifffile.imwrite(images / "no_regions.tif", he_image(4))
    (annotations / "no_regions.xml").write_text(region_xml([]))
    (images / "corrupt.tif").write_bytes(b"II*\x00 this is not really a tiff")
    (annotations / "corrupt.xml").write_text(region_xml(NUCLEI))
    tifffile.imwrite(images / "wrong_size.tif", he_image(5))
    Image.fromarray(np.ones((SIZE + 3, SIZE), dtype=np.uint8)).save(masks / "wrong_size.png")
    tifffile.imwrite(images / "bad_xml.tif", he_image(6))
    (annotations / "bad_xml.xml").write_text("<Annotations><Annotation>")
    tifffile.imwrite(images / "fallback.tif", he_image(8))  # unusable XML, but a binary mask
    (annotations / "fallback.xml").write_text(region_xml([TWO_VERTICES]))
    Image.fromarray(np.pad(np.ones((4, 4), np.uint8), 22)).save(masks / "fallback.png")

    with caplog.at_level(logging.WARNING, logger="sppnet_monai.data"):
        summary = prepare_monuseg(src, tmp_path / "dst")
    assert sorted(summary["images"]) == ["fallback", "img_a", "img_b", "img_c"]
    assert summary["images"]["fallback"]["instances"] == "connected_components"
    assert warnings_about(summary, "fallback.xml: no usable Region (all 1 degenerate); using ")
    culprits = {
        "no_annotation.tif": "no matching annotation XML or binary mask",
        "no_regions.xml": "has no Region",
        "corrupt.tif": "cannot read image",
        "wrong_size.png": "mask is 51x48 but its image is 48x48",
        "bad_xml.xml": "cannot parse annotation XML",
    }
    for file_name, problem in culprits.items():
        (message,) = [w for w in summary["warnings"] if file_name in w]
        assert problem in message and "\n" not in message
        assert any(r.name == "sppnet_monai.data" and r.getMessage() == message for r in caplog.records)


def test_nothing_usable_or_missing_source_raises(tmp_path):
    with pytest.raises(SPPNetError, match="does not exist"):
        prepare_monuseg(tmp_path / "missing", tmp_path / "dst")
    src = tmp_path / "src"
    (src / "Tissue_Images").mkdir(parents=True)
    tifffile.imwrite(src / "Tissue_Images" / "lonely.tif", he_image(0))
    with pytest.raises(SPPNetError, match="no usable image"):
        prepare_monuseg(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "datalist.json").exists()
    with pytest.raises(SPPNetError, match="val_fraction"):
        prepare_monuseg(src, tmp_path / "dst", val_fraction=1.5)


# --------------------------------------------------------------------------- folder, split


def make_folder(root: Path, count: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        Image.fromarray(he_image(i, 16)).save(root / "images" / f"s{i:02d}.png")
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"s{i:02d}.png")


def test_prepare_folder_masks(tmp_path):
    src = tmp_path / "src"
    make_folder(src, 2)
    instance_map = np.zeros((16, 16), dtype=np.uint16)
    instance_map[2:8, 2:6], instance_map[2:8, 6:10] = 7, 300  # touching: stays two instances
    tifffile.imwrite(src / "masks" / "s01.tif", instance_map)
    (src / "masks" / "s01.png").unlink()
    Image.fromarray(he_image(9, 20)).save(src / "images" / "s02.jpg")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(src / "masks" / "s02.png")  # wrong size
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(src / "masks" / "orphan.png")

    summary = prepare_folder(src, tmp_path / "dst")
    assert summary["images"]["s00"]["instances"] == "connected_components"
    assert summary["images"]["s01"]["instances"] == "instance_map"
    assert summary["images"]["s01"]["num_instances"] == 2
    assert sorted(np.unique(read_png(tmp_path / "dst" / "labels" / "s01.png")).tolist()) == [0, 1, 2]
    assert warnings_about(summary, "s02.png: mask is 16x16 but its image is 20x20")
    assert warnings_about(summary, "orphan.png: no matching image")


def test_split_is_deterministic_per_seed(tmp_path):
    names = [f"n{i}" for i in range(10)]
    train, val = split_train_val(names, 0.2, seed=0)
    assert (train, val) == split_train_val(list(reversed(names)), 0.2, seed=0)
    assert len(val) == 2 and sorted(train + val) == names
    assert any(split_train_val(names, 0.2, seed=s)[1] != val for s in (1, 2))
    assert len(split_train_val(names[:2], 0.01, seed=0)[1]) == 1  # >= 1 validation image
    assert split_train_val(names[:1], 0.5, seed=0) == (["n0"], [])

    make_folder(tmp_path / "src", 6)
    datalists = []
    for run, seed in enumerate((0, 0, 1)):
        prepare_folder(tmp_path / "src", tmp_path / f"dst{run}", seed=seed)
        datalists.append(json.loads((tmp_path / f"dst{run}" / "datalist.json").read_text())["validation"])
    assert datalists[0] == datalists[1] != datalists[2]


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 2), 128, np.uint8), [128, 128, 128]),  # grey
        (np.full((2, 2, 3), 65535, np.uint16), [255, 255, 255]),  # 16-bit RGB
        (np.full((2, 2), 257 * 10, np.uint16), [10, 10, 10]),  # 16-bit grey
        (np.full((2, 2), 257 * 10, np.int32), [10, 10, 10]),  # 16-bit grey read as Pillow mode "I"
        (np.full((2, 2, 4), [200, 100, 50, 0], np.uint8), [255, 255, 255]),  # transparent -> white
        (np.full((2, 2, 4), [200, 100, 50, 255], np.uint8), [200, 100, 50]),  # opaque RGBA
        (np.full((2, 2, 3), 0.5, np.float32), [128, 128, 128]),  # float in [0, 1]
    ],
)
def test_to_rgb_uint8(array, expected):
    rgb = to_rgb_uint8(array)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == expected


def test_image_formats_are_converted(tmp_path):
    src = tmp_path / "src"
    make_folder(src, 3)
    grey16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    tifffile.imwrite(src / "images" / "s00.tif", grey16)
    (src / "images" / "s00.png").unlink()
    Image.fromarray(np.dstack([he_image(1, 16), np.full((16, 16), 255, np.uint8)])).save(src / "images" / "s01.png")
    prepare_folder(src, tmp_path / "dst")
    grey = read_png(tmp_path / "dst" / "images" / "s00.png")
    assert grey.shape == (16, 16, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 1], np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(read_png(tmp_path / "dst" / "images" / "s01.png"), he_image(1, 16))


def test_instances_from_mask_rejects_fractional():
    with pytest.raises(ValueError, match="fractional"):
        instances_from_mask(np.full((4, 4), 0.5))


# --------------------------------------------------------------------------- demo


def test_demo_is_deterministic_and_has_touching_and_overlapping_nuclei(tmp_path):
    summary = prepare_demo(tmp_path / "a", num_images=3, image_size=128, seed=0)
    prepare_demo(tmp_path / "b", num_images=3, image_size=128, seed=0)
    prepare_demo(tmp_path / "c", num_images=3, image_size=128, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 6
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()
    assert summary["counts"] == {"training": 2, "validation": 1}

    images = summary["images"]
    assert sum(info["overlapping_pairs"] for info in images.values()) > 0
    for name, info in images.items():
        labels = read_png(tmp_path / "a" / "labels" / f"{name}.png")
        image = read_png(tmp_path / "a" / "images" / f"{name}.png").astype(float)
        assert labels.dtype == np.uint16 and image.shape == (128, 128, 3)
        assert info["num_instances"] == int(labels.max()) >= 5
        assert info["touching_pairs"] == len(touching_pairs(labels)) > 0
        nuclei, stroma = image[labels > 0], image[labels == 0]
        assert nuclei.mean() < stroma.mean() - 20  # nuclei are clearly darker
        assert nuclei[:, 2].mean() - nuclei[:, 0].mean() > stroma[:, 2].mean() - stroma[:, 0].mean()  # bluer


def test_demo_is_not_a_single_threshold_away():
    """The best grey-level threshold stays well short of perfect: blur, noise, pale nuclei."""
    from sppnet_monai.data.synthetic import synthesize_sample

    sample = synthesize_sample(np.random.default_rng([0, 0]), 256)
    grey, truth = sample.image.mean(axis=-1), sample.labels > 0
    dices = [2 * np.sum((grey < t) & truth) / (np.sum(grey < t) + truth.sum()) for t in range(40, 250, 5)]
    assert 0.5 < max(dices) < 0.95


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "sppnet_monai", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_prepare_demo(tmp_path):
    result = run_cli("prepare", "demo", str(tmp_path / "demo"), "--num_images=2", "--image_size=64")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {"training": 1, "validation": 1}
    assert sorted(p.name for p in (tmp_path / "demo" / "images").iterdir()) == ["demo_000.png", "demo_001.png"]
    assert (tmp_path / "demo" / "datalist.json").is_file()


def test_cli_error_is_one_line(tmp_path):
    result = run_cli("prepare", "monuseg", str(tmp_path / "missing"), str(tmp_path / "dst"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0]

"""Labels from annotation clients (QuPath ASAP XML, DSA JSON, masks) -> instance maps, and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sppnet_monai.workflows.datasets import datalist_split
from sppnet_monai.data.image_io import read_mask, write_png
from sppnet_monai.data.instances import FROM_CONNECTED_COMPONENTS, FROM_XML, count_instances
from sppnet_monai.data.labels import LabelError, label_instances, parse_asap_xml, parse_dsa_json
from sppnet_monai.data.prepare import labelled_sample, prepare_labelled
from sppnet_monai.data.synthetic import write_nuclei_slide


def asap_xml(polygons: list[list[tuple[float, float]]], patch=(0, 0, 0, 0), point: bool = False) -> str:
    """ASAP XML as QuPath's Submit Label writes it: ``polygons`` of (x, y) relative to ``patch``'s X/Y."""
    x, y, w, h = patch
    annotations = []
    for polygon in polygons:
        coords = "".join(f'<Coordinate Order="{i}" X="{px}" Y="{py}"/>' for i, (px, py) in enumerate(polygon))
        annotations.append(f'<Annotation Name="nuclei" Type="Polygon" PartOfGroup="nuclei"><Coordinates>{coords}</Coordinates></Annotation>')
    if point:
        annotations.append('<Annotation Name="nuclei" Type="Point"><Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates></Annotation>')
    return (
        f'<?xml version="1.0"?><ASAP_Annotations><Annotations Name="" Description="" X="{x}" Y="{y}" W="{w}" H="{h}">'
        f'{"".join(annotations)}</Annotations><AnnotationGroups/></ASAP_Annotations>'
    )


def square(x0: float, y0: float, side: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]


# Two squares that share an edge (x = 20): touching nuclei, outlined one by one.
TOUCHING = [square(10, 10, 10), square(20, 10, 10)]


def test_asap_patch_label_gives_one_instance_per_outline(tmp_path):
    path = tmp_path / "patch.xml"
    path.write_text(asap_xml(TOUCHING, patch=(1000, 2000, 40, 32), point=True))
    labels, how = label_instances(path, (32, 40))
    assert how == FROM_XML
    assert count_instances(labels) == 2  # touching, still two: outlined one by one; the point is no outline
    assert labels[15, 15] != labels[15, 25] and labels[15, 15] > 0 and labels[15, 25] > 0
    assert np.count_nonzero(labels) == 200  # the half-open rule: a 10x10 square is 100 pixels, no rim


def test_asap_patch_origin_is_kept_and_coordinates_are_patch_relative():
    label = parse_asap_xml(asap_xml(TOUCHING, patch=(1000, 2000, 40, 32)))
    assert label.patch == (1000, 2000, 40, 32)
    assert label.bounds() == (10.0, 10.0, 20.0, 30.0)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<ASAP_Annotations><Annotations>", "not valid ASAP XML"),
        (asap_xml([]), "no nucleus outline"),
        (asap_xml([[(1, 1), (5, 1)]]), "no nucleus outline"),  # two coordinates: no polygon
        (asap_xml([square(100, 100, 10)], patch=(0, 0, 40, 32)), "outside the 40x32 image"),
        (asap_xml(TOUCHING, patch=(0, 0, 64, 64)), "patch is 64x64"),
        (asap_xml(TOUCHING).replace('X="10"', 'X="ten"', 1), "not a finite number"),
        (asap_xml(TOUCHING).replace('X="10"', 'X="inf"', 1), "not a finite number"),
    ],
)
def test_bad_asap_labels_are_refused_with_their_reason(tmp_path, text, reason):
    path = tmp_path / "image-7.xml"
    path.write_text(text)
    with pytest.raises(LabelError) as err:
        label_instances(path, (32, 40), name="image-7")
    message = str(err.value)
    assert reason in message and message.startswith("image-7:") and str(tmp_path) not in message and "\n" not in message


def test_dsa_polylines_and_rectangles():
    document = {
        "annotation": {
            "name": "nuclei",
            "elements": [
                {"type": "polyline", "closed": True, "points": [[x, y, 0] for x, y in TOUCHING[0]]},
                {"type": "rectangle", "center": [25, 15, 0], "width": 10, "height": 10, "rotation": 0},
                {"type": "point", "center": [3, 3, 0]},
            ],
        }
    }
    label = parse_dsa_json(json.dumps([document]))
    assert len(label.regions) == 2 and label.patch is None
    with pytest.raises(LabelError, match="no 'elements' list"):
        parse_dsa_json(json.dumps({"name": "x"}))
    with pytest.raises(LabelError, match="not valid JSON"):
        parse_dsa_json("{")


def test_mask_labels_binary_and_refusals(tmp_path):
    mask = np.zeros((32, 40), np.uint8)
    mask[5:10, 5:10] = 255
    mask[20:25, 20:30] = 255
    write_png(tmp_path / "mask.png", mask)
    labels, how = label_instances(tmp_path / "mask.png", (32, 40))
    assert (count_instances(labels), how) == (2, FROM_CONNECTED_COMPONENTS)
    with pytest.raises(LabelError, match="mask is 32x40 but its image is 30x30"):
        label_instances(tmp_path / "mask.png", (30, 30))
    write_png(tmp_path / "empty.png", np.zeros((32, 40), np.uint8))
    with pytest.raises(LabelError, match="holds no nucleus"):
        label_instances(tmp_path / "empty.png", (32, 40))
    (tmp_path / "label.txt").write_text("x")
    with pytest.raises(LabelError, match="a label must be one of"):
        label_instances(tmp_path / "label.txt", (32, 40))


def test_prepare_labelled_patches_and_a_slide_label(tmp_path):
    rng = np.random.default_rng(0)
    pairs = {}
    for index in range(3):
        image = tmp_path / f"patch{index}.png"
        write_png(image, rng.integers(0, 255, (32, 40, 3), dtype=np.uint8))
        label = tmp_path / f"patch{index}.xml"
        label.write_text(asap_xml(TOUCHING, patch=(100 * index, 0, 40, 32)))
        pairs[f"patch{index}"] = (str(image), str(label))
    bad = tmp_path / "bad.xml"
    bad.write_text(asap_xml([]))
    pairs["bad"] = (pairs["patch0"][0], str(bad))
    # A whole-slide label (QuPath's WSI choice: X = Y = W = H = 0, slide pixels): its area is cut out.
    slide = tmp_path / "slide.tif"
    write_nuclei_slide(slide, 512, 384, np.array([[300.0, 200.0]]), radius=9.0, levels=2, tile=128, mpp=0.25)
    slide_label = tmp_path / "slide.xml"
    slide_label.write_text(asap_xml([square(290, 190, 20), square(310, 190, 12)]))
    pairs["slide"] = (str(slide), str(slide_label))
    summary = prepare_labelled(pairs, tmp_path / "prepared", val_fraction=0.25)
    assert sorted(summary["images"]) == ["patch0", "patch1", "patch2", "slide"]
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("bad: no nucleus outline")
    sample = summary["images"]["slide"]
    assert sample["instances"] == FROM_XML and sample["num_instances"] == 2
    x0, y0, w, h = sample["slide_region"]
    assert (x0, y0) == (290 - 32, 190 - 32) and w == 20 + 12 + 64 + 1 and h == 20 + 64 + 1
    labels = read_mask(tmp_path / "prepared" / "labels" / "slide.png")
    assert labels.shape == (h, w) and labels[32 + 5, 32 + 5] == 1 and labels[32 + 5, 32 + 25] == 2
    entries = datalist_split(tmp_path / "prepared", "training") + datalist_split(tmp_path / "prepared", "validation")
    assert len(entries) == 4


def test_labelled_sample_messages_name_the_id_not_the_path(tmp_path):
    label = tmp_path / "label.xml"
    label.write_text(asap_xml(TOUCHING))
    with pytest.raises(Exception) as err:
        labelled_sample(tmp_path / "missing.png", label, "image-3")
    assert str(err.value).startswith("image-3:") and str(tmp_path) not in str(err.value)


def test_instances_to_asap_xml_round_trips_through_the_polygon_rule(tmp_path):
    from skimage.draw import disk

    from sppnet_monai.data.labels import instances_to_asap_xml

    truth = np.zeros((48, 64), np.int64)
    for index, centre in enumerate([(12, 12), (12, 22), (30, 45)], start=1):  # two touching disks and one apart
        truth[disk(centre, 6, shape=truth.shape)] = index
    path = tmp_path / "patch.xml"
    path.write_text(instances_to_asap_xml(truth, 100, 200))
    labels, _ = label_instances(path, truth.shape)
    assert parse_asap_xml(path.read_text()).patch == (100, 200, 64, 48)
    assert count_instances(labels) == 3
    overlap = np.count_nonzero((labels > 0) & (truth > 0)) * 2 / (np.count_nonzero(labels) + np.count_nonzero(truth))
    assert overlap > 0.9

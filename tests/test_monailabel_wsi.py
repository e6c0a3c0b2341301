"""MONAI Label's whole-slide protocol against a real server (127.0.0.1): the QuPath extension's and DSA's requests.

The slide is a generated pyramidal tiled TIFF with haematoxylin disks at known positions; the app
serves the bundle's shipped model. Requests are built exactly as the clients build them:

- QuPath: ``plugins/qupath/src/main/java/qupath/lib/extension/monailabel/MonaiLabelClient.java``
  (monailabel 0.8.5), ``RequestInfer`` (lines 147-154: ``level``, ``location``, ``size``,
  ``tile_size`` = [1024, 1024], ``min_poly_area`` = 30, ``params``), ``InferParams`` (lines 132-145:
  ``foreground``, ``background`` as integer pairs, ``max_workers`` = 1), serialised by Gson
  (line 175) and posted to ``/infer/wsi/{model}?output=asap&image=ID`` for a slide of the datastore,
  or uploaded as multipart (``file`` + field ``wsi``) to ``/infer/wsi_v2/{model}`` (lines 169-190);
  ``commands/RunInference.java`` lines 225-231 fill location/size/tile_size from the rectangle and
  lines 292-294 the clicks and max_workers. The answer is parsed as that file's
  ``updateAnnotations`` (lines 338-371) does: every ``Annotation`` element, its ``Coordinates``
  child's ``Coordinate`` X / Y attributes, in slide pixels.
- DSA: ``/infer/wsi/{model}?output=dsa&image=ID`` with the same body; the answer's ``elements`` are
  polylines whose ``points`` are ``[x, y, 0]`` slide pixels.
"""

from __future__ import annotations

import json
import shutil
import xml.dom.minidom

import numpy as np
import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

from test_monailabel import REPO, running_server  # noqa: E402  (the app's launcher, imported there)

from sppnet_monai.data.synthetic import nuclei_slide_tile, write_nuclei_slide  # noqa: E402

pytestmark = pytest.mark.slow

WIDTH, HEIGHT, RADIUS = 1536, 1024, 9.0


def _centres() -> np.ndarray:
    rng = np.random.default_rng(3)
    xs, ys = np.meshgrid(np.arange(40, WIDTH - 30, 60), np.arange(40, HEIGHT - 30, 60))
    return np.stack([xs.ravel(), ys.ravel()], 1) + rng.uniform(-6, 6, (xs.size, 2))


@pytest.fixture(scope="module")
def wsi_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    studies = root / "studies"
    studies.mkdir()
    write_nuclei_slide(studies / "slide.tif", WIDTH, HEIGHT, _centres(), radius=RADIUS, levels=3, tile=256, mpp=0.25)
    from PIL import Image

    Image.fromarray(nuclei_slide_tile((0, 0), (300, 400), _centres(), RADIUS)).save(studies / "plain.png")
    bundle = root / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", bundle / "configs")
    shutil.copytree(REPO / "bundle" / "weights", bundle / "weights")
    with running_server(root, studies, bundle) as running:
        yield running, root


def qupath_body(location, size, foreground=(), background=(), tile_size=1024) -> str:
    """The JSON Gson makes of RequestInfer (field order of the Java class)."""
    request = {
        "level": 0,
        "location": list(location),
        "size": list(size),
        "tile_size": [tile_size, tile_size],
        "min_poly_area": 30,
        "params": {"foreground": [list(map(int, p)) for p in foreground], "background": [list(map(int, p)) for p in background], "max_workers": 1},
    }
    return json.dumps(request, separators=(",", ":"))


def parse_asap(text: str) -> list[np.ndarray]:
    """Polygons as QuPath's RunInference.updateAnnotations reads them."""
    dom = xml.dom.minidom.parseString(text)
    polygons = []
    for annotation in dom.getElementsByTagName("Annotation"):
        assert annotation.getAttribute("Name") == "Nucleus"
        for coordinates in [n for n in annotation.childNodes if n.nodeType == n.ELEMENT_NODE]:
            points = [(float(c.getAttribute("X")), float(c.getAttribute("Y"))) for c in coordinates.getElementsByTagName("Coordinate")]
            polygons.append(np.array(points))
    return polygons


def _on_known_nuclei(polygons, region) -> None:
    """Every polygon is on a known disk; every disk whose centre lies inside ``region`` has exactly one polygon.

    A polygon's mean is on its disk (within the radius; a disk cut by the region's edge pulls it off the centre),
    and within 4 px of the centre for a disk wholly inside the region."""
    x, y, w, h = region
    centres = _centres()
    inside = centres[(centres[:, 0] >= x) & (centres[:, 0] < x + w) & (centres[:, 1] >= y) & (centres[:, 1] < y + h)]
    means = np.array([p.mean(0) for p in polygons]).reshape(-1, 2)
    distance = np.hypot(*(means[:, None] - centres[None]).transpose(2, 0, 1))
    assert (distance.min(1) < RADIUS).all(), "a polygon away from every nucleus"
    whole = (inside[:, 0] - RADIUS >= x) & (inside[:, 0] + RADIUS < x + w) & (inside[:, 1] - RADIUS >= y) & (inside[:, 1] + RADIUS < y + h)
    tolerance = np.where(whole, 4.0, RADIUS)
    counts = (np.hypot(*(means[None] - inside[:, None]).transpose(2, 0, 1)) < tolerance[:, None]).sum(1)
    assert (counts == 1).all(), f"{(counts == 0).sum()} nuclei missed ({inside[counts == 0].round().tolist()}), {(counts > 1).sum()} duplicated"


def test_info_exposes_pathology_models_for_qupath(wsi_server):
    (url, _), _ = wsi_server
    models = requests.get(f"{url}/info/", timeout=30).json()["models"]
    assert models["sppnet"]["pathology"] and not models["sppnet"]["nuclick"]
    assert models["sppnet_click"]["nuclick"]


def test_qupath_rectangle_without_clicks_gets_every_nucleus_as_asap_xml(wsi_server):
    (url, _), _ = wsi_server
    region = (300, 200, 1100, 700)  # two 1024 tiles across, as MONAI Label cuts it
    response = requests.post(
        f"{url}/infer/wsi/sppnet", params={"output": "asap", "image": "slide"}, data=qupath_body(region[:2], region[2:]),
        headers={"Content-Type": "application/json"}, timeout=300,
    )
    assert response.status_code == 200, response.text
    _on_known_nuclei(parse_asap(response.text), region)


def test_qupath_click_tool_request_answers_the_clicked_nucleus(wsi_server):
    """The shipped model has a click head: QuPath's click tool gets the clicked nucleus alone, in slide pixels."""
    (url, _), _ = wsi_server
    click = _centres()[40].round()
    bbox = (int(click[0]) - 64, int(click[1]) - 64, 128, 128)  # InteractorTool: patch 128 around the point
    response = requests.post(
        f"{url}/infer/wsi/sppnet_click", params={"output": "asap", "image": "slide"},
        data=qupath_body(bbox[:2], bbox[2:], foreground=[click], tile_size=128), headers={"Content-Type": "application/json"}, timeout=120,
    )
    assert response.status_code == 200, response.text
    polygons = parse_asap(response.text)
    assert len(polygons) == 1 and np.hypot(*(polygons[0].mean(0) - _centres()[40])) < 4


def test_qupath_upload_to_wsi_v2(wsi_server):
    (url, _), root = wsi_server
    region = (0, 0, 512, 400)
    with open(root / "studies" / "slide.tif", "rb") as f:
        response = requests.post(
            f"{url}/infer/wsi_v2/sppnet", params={"output": "asap"}, files={"file": ("upload.tif", f)},
            data={"wsi": qupath_body(region[:2], region[2:])}, timeout=300,
        )
    assert response.status_code == 200, response.text
    _on_known_nuclei(parse_asap(response.text), region)


def test_plain_image_gets_asap_xml_too(wsi_server):
    (url, _), _ = wsi_server
    response = requests.post(
        f"{url}/infer/wsi/sppnet", params={"output": "asap", "image": "plain"}, data=qupath_body((0, 0), (0, 0)),
        headers={"Content-Type": "application/json"}, timeout=120,
    )
    assert response.status_code == 200, response.text
    _on_known_nuclei(parse_asap(response.text), (0, 0, 400, 300))


def test_dsa_request_gets_polylines_in_slide_pixels(wsi_server):
    (url, _), _ = wsi_server
    region = (700, 300, 600, 500)
    response = requests.post(
        f"{url}/infer/wsi/sppnet", params={"output": "dsa", "image": "slide"}, data=qupath_body(region[:2], region[2:]),
        headers={"Content-Type": "application/json"}, timeout=300,
    )
    assert response.status_code == 200, response.text
    elements = response.json()["elements"]
    assert all(e["type"] == "polyline" and e["closed"] and e["label"]["value"] == "Nucleus" for e in elements)
    _on_known_nuclei([np.array(e["points"])[:, :2] for e in elements], region)


@pytest.mark.parametrize(
    "query, body, status, message",
    [
        ({"output": "asap"}, qupath_body((0, 0), (256, 256)), 400, "give the slide"),
        ({"output": "asap", "image": "nope"}, qupath_body((0, 0), (256, 256)), 404, "unknown image id"),
        ({"output": "asap", "image": "slide"}, qupath_body((1400, 0), (256, 256)), 400, "not inside slide.tif"),
        ({"output": "asap", "image": "slide"}, qupath_body((2**64, 0), (256, 256)), 4, ""),
        ({"output": "asap", "image": "slide"}, json.dumps({"level": 7, "location": [0, 0], "size": [256, 256]}), 400, "not level 7"),
        ({"output": "asap", "image": "slide"}, qupath_body((0, 0), (256, 256), foreground=[[300, 10]]), 400, "outside the region"),
        ({"output": "asap", "image": "slide"}, qupath_body((0, 0), (256, 256), tile_size=8), 400, "tile_size must be"),
        ({"output": "asap", "image": "slide"}, json.dumps({"location": [0, 0], "size": [256, 256], "params": [1, 2]}), 422, ""),
    ],
)
def test_bad_wsi_requests_get_4xx_with_the_reason(wsi_server, query, body, status, message):
    (url, proc), _ = wsi_server
    response = requests.post(f"{url}/infer/wsi/sppnet", params=query, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    if status == 4:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status, response.text
    assert message in response.text
    assert proc.poll() is None

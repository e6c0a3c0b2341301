"""``python -m sppnet_monai`` at first contact: the command listing, and one clear line for a bad checkpoint,
a click outside the image and the images of a folder that could not be read."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sppnet_monai.cli import Commands, Prepare, main
from sppnet_monai.networks.checkpoints import read_state_dict
from sppnet_monai.utils import SPPNetError

REPO = Path(__file__).resolve().parents[1]
# Every command a user can run, with the method whose docstring's first line is its summary.
COMMANDS = {
    "info": Commands.info,
    "benchmark": Commands.benchmark,
    "evaluate": Commands.evaluate,
    "release": Commands.release,
    "predict": Commands.predict,
    "prepare monuseg": Prepare.monuseg,
    "prepare folder": Prepare.folder,
    "prepare demo": Prepare.demo,
}


from test_predict import checkpoint  # noqa: E402,F401  (the same untrained checkpoint fixture)


def _image(path: Path, width: int = 40, height: int = 48) -> Path:
    """A random RGB PNG (whatever the name's suffix)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``main(argv)``."""
    try:
        main(argv)
        status = 0
    except SystemExit as done:
        status = done.code
    out, err = capsys.readouterr()
    return status, out, err


def _errors(err: str) -> list[str]:
    """The ``error:`` lines of stderr (the rest is the progress bar)."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def _assert_listing(text: str) -> None:
    lines = text.splitlines()
    for name, method in COMMANDS.items():
        summary = inspect.getdoc(method).splitlines()[0].replace("``", "")
        assert any(line.split()[: len(name.split())] == name.split() and line.rstrip().endswith(summary) for line in lines), (name, text)


def test_help_lists_every_command_with_its_summary(capsys):
    result = subprocess.run([sys.executable, "-m", "sppnet_monai", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_listing(result.stdout)
    for argv in ([], ["-h"]):  # no command at all lists them too
        status, out, err = _run(argv, capsys)
        assert status == 0 and not err
        _assert_listing(out)


def test_help_of_a_command_taking_overrides_shows_its_flags_and_runs_nothing(capsys, tmp_path):
    # predict takes **overrides: fire alone took --help for an override (exit 2, or a run with help=True).
    for argv in (["predict", "--help"], ["predict", str(tmp_path / "in.png"), str(tmp_path / "out"), "--help"]):
        status, _, err = _run(argv, capsys)
        assert status == 0 and "--checkpoint" in err and "error" not in err.lower()
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    text = tmp_path / "model.txt"
    text.write_text("checkpoint\n")
    image = _image(tmp_path / "a.png")
    expected = f"error: {text}: not a PyTorch checkpoint (a text file starting 'checkpoint')."
    # The one loading function serves predict (through the inference config) and release alike.
    for argv in (["predict", str(image), str(tmp_path / "out"), "--checkpoint", str(text)], ["release", str(text), str(tmp_path / "r.pt")]):
        status, _, err = _run(argv, capsys)
        assert status == 2 and err.splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def _global_pickle(path: Path) -> None:
    torch.save({"weights": torch.zeros(2), "hook": print}, path)  # loading it as weights only must refuse `print`


def _truncated(path: Path) -> None:
    buffer = path.with_suffix(".full")
    torch.save({"weights": torch.zeros(64)}, buffer)
    path.write_bytes(buffer.read_bytes()[:200])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"), "a Git LFS pointer"),
        (lambda p: p.write_text("<!DOCTYPE html><html>Not found</html>"), "a text file starting '<!DOCTYPE html><html>Not found</html>'"),
        (lambda p: _image(p), "neither a zip archive nor a pickle; it starts with bytes 89 50 4e 47"),
        (_global_pickle, "UnpicklingError: Unsupported global: GLOBAL print was not an allowed global by default"),
        (_truncated, "PytorchStreamReader failed reading zip archive"),
    ],
    ids=["empty", "lfs-pointer", "html", "png", "unsafe-global", "truncated"],
)
def test_unreadable_checkpoints_name_the_file_and_a_short_reason(tmp_path, make, reason):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(SPPNetError) as raised:
        read_state_dict(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint (") and message.endswith(").") and reason in message
    assert "\n" not in message and "weights_only" not in message and "\x1b" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no traceback repeating torch's advice


def test_click_outside_the_image_is_one_line(checkpoint, tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({"a.png": {"foreground": [[500, 3]], "background": []}}))
    status, out, err = _run(["predict", str(image), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--clicks", str(clicks)], capsys)
    assert status == 2 and not out
    assert err.splitlines() == [
        f"error: foreground click [500, 3] is outside {image} (40x48, clicks are [x, y] with -0.5 <= x < 39.5 and -0.5 <= y < 47.5)."
    ]


def test_a_folder_with_bad_images_writes_the_good_ones_and_names_each_bad_one(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _image(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "empty.tif").write_bytes(b"")
    out = tmp_path / "out"
    status, stdout, err = _run(["predict", str(folder), str(out), "--checkpoint", str(checkpoint)], capsys)
    errors = _errors(err)
    assert status == 1
    assert (out / "good_mask.png").is_file() and (out / "good_instances.png").is_file()
    summary = json.loads(stdout)
    assert list(summary["images"]) == [str(folder / "good.png")] and len(summary["failed"]) == 2
    for bad, reason in (("broken.png", "cannot identify image file"), ("empty.tif", "not a TIFF file")):
        named = [line for line in errors if bad in line]
        assert len(named) == 1 and reason in named[0], errors
    assert errors[-1] == "error: 2 of 3 images failed."
    # Nothing usable at all: each image named, then the count, and the status of a user error.
    (folder / "good.png").unlink()
    status, stdout, err = _run(["predict", str(folder), str(tmp_path / "none"), "--checkpoint", str(checkpoint)], capsys)
    errors = _errors(err)
    assert status == 2 and not stdout and len(errors) == 3
    assert "broken.png" in errors[0] and "empty.tif" in errors[1] and errors[2] == "error: no image could be processed (2 failed)."

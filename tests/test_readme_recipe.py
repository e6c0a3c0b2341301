"""The README's MONAI Label recipe, run verbatim in a fresh copy of the repository's tracked files.

Each line of the recipe's bash block runs as written (the port aside: a free one); the server line runs in the
background. Every answer must be JSON without an error ``detail``. Skipped unless ``monailabel`` is installed;
``tests/test_monailabel_env.py`` runs it in that environment.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "monailabel_app"))
from serve import free_port, stop_process_group  # noqa: E402

pytestmark = pytest.mark.slow
MARKER = "Every line runs on a fresh clone:"


def recipe() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_monailabel_recipe_runs_verbatim_on_a_fresh_clone(tmp_path):
    # What a clone of the work tree holds: tracked files and new ones not ignored.
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    port = str(free_port())
    lines = [line.replace("8000", port) for line in recipe()]
    server_line = next(line for line in lines if "start_server" in line)
    assert "runs/demo" in lines[0] and not (clone / "runs").exists()
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(lines[0], shell=True, cwd=clone, env=env, check=True, capture_output=True)
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(server_line, shell=True, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for _ in range(180):
                try:
                    if requests.get(f"http://127.0.0.1:{port}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            else:
                pytest.fail((tmp_path / "server.log").read_text()[-3000:])
            for line in lines[lines.index(server_line) + 1 :]:
                done = subprocess.run(line, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
                assert done.returncode == 0, (line, done.stderr)
                for answer in filter(None, re.split(r"(?<=\})(?=\{)", done.stdout.strip())):
                    assert "detail" not in json.loads(answer), (line, answer)
        finally:
            stop_process_group(server)
    assert (clone / "bundle" / "models").is_dir()

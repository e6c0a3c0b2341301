"""The MONAI Label extra installed as the README says, and the app's integration tests run inside it.

``monailabel`` 0.8.5 pins numpy 1.26, so it lives in its own virtual environment
(``.venv-monailabel``), which holds the project too. When this interpreter lacks monailabel, this slow
test builds that environment with the README's recipe (once; later runs reuse it) and runs the
app's tests (:data:`APP_TESTS`) there: ``python -m pytest -m slow tests/test_monailabel_env.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-monailabel"
APP_TESTS = [
    "tests/test_monailabel.py", "tests/test_monailabel_wsi.py", "tests/test_monailabel_train.py", "tests/test_monailabel_train_params.py",
    "tests/test_monailabel_loop.py", "tests/test_readme_recipe.py",
]


def _has_monailabel(python: Path) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", "import monailabel"], capture_output=True).returncode == 0


@pytest.mark.skipif(importlib.util.find_spec("monailabel") is not None, reason="monailabel is installed here: the APP_TESTS run directly")
def test_monailabel_app_in_its_own_environment():
    python = VENV / "bin" / "python"
    if not _has_monailabel(python):
        # The README's recipe. From a virtual environment too: the new one then shares the system
        # interpreter's packages, not this environment's, and the project's requirements are installed.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "wheel", "-r", str(REPO / "requirements.txt")], check=True)
        subprocess.run([*pip, "-e", str(REPO)], check=True)
        # --no-build-isolation: monailabel's sam2 dependency builds against the installed torch.
        requirements = REPO / "monailabel_app" / "requirements.txt"
        subprocess.run([*pip, "--no-build-isolation", "-r", str(requirements)], check=True, env=os.environ | {"SAM2_BUILD_CUDA": "0"})
    assert _has_monailabel(python)
    tests = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-m", "slow or not slow", *APP_TESTS],
        cwd=REPO, capture_output=True, text=True,
    )
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr
    assert tests.returncode == 0 and " passed" in summary and "skipped" not in summary, tests.stdout[-4000:] + tests.stderr[-2000:]

"""Start the app's MONAI Label server in a subprocess on a free local port (for tests and benchmark scripts)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

APP = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(workdir: Path, studies: Path, bundle: Path, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """``monailabel start_server`` of this app on 127.0.0.1: yields ``(url, process)``; stopped whatever happens.

    The log goes to ``workdir/server_<port>.log``; an early exit or a start slower than ``timeout`` raises with its tail.
    """
    import requests

    port = free_port()
    log_path = Path(workdir) / f"server_{port}.log"
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
        "--conf", "bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir), start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield url, proc
        finally:
            stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop ``proc``, started with ``start_new_session=True``, and every process of its group: the training
    subprocesses a MONAI Label server starts, or the server a ``shell=True`` command line starts, which
    ``proc.terminate()`` alone would leave running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a leader that ignored SIGTERM, and children that outlive it
    proc.wait()


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1

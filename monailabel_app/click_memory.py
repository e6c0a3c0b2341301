"""Send N click requests to a running MONAI Label SPPNet server and report its resident set size.

    python monailabel_app/click_memory.py --pid SERVER_PID --image demo_000 --click 126 86 [--n 50]

The server PID is the ``monailabel start_server`` python process (e.g. ``pgrep -f 'monailabel.main start_server'``).
Clicks cycle over a few positions around ``--click`` so the decoder runs on varied prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import requests


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--click", type=int, nargs=2, required=True, metavar=("X", "Y"))
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    x, y = args.click
    offsets = [(0, 0), (2, 0), (0, 2), (-2, 0), (0, -2)]

    def click(i: int, output: str = "json") -> dict:
        dx, dy = offsets[i % len(offsets)]
        params = {"foreground": [[max(0, x + dx), max(0, y + dy)]]}
        r = requests.post(f"{args.url}/infer/sppnet", params={"image": args.image, "output": output},
                          data={"params": json.dumps(params)}, timeout=300)
        r.raise_for_status()
        return r.json() if output == "json" else {}

    for i in range(args.warmup):
        click(i)
    before = rss_mib(args.pid)
    start = time.perf_counter()
    for i in range(args.n):
        click(i, output="all")
    elapsed = time.perf_counter() - start
    after = rss_mib(args.pid)
    runs = click(0)["encoder_runs"]
    print(f"{args.n} clicks on {args.image}: RSS before {before:.1f} MiB, after {after:.1f} MiB, "
          f"growth {after - before:+.1f} MiB; {elapsed / args.n * 1000:.0f} ms/click; encoder runs so far {runs}")


if __name__ == "__main__":
    main()

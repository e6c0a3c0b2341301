"""The bundle README's validation table: SPPNet, the U-Net baseline and the classical baseline, both click protocols.

Usage:
    python scripts/validation_table.py PREPARED_DIR OUTPUT_DIR [--sppnet CKPT] [--previous CKPT] [--unet CKPT] [--ablation] [--flip_tta]

Every row is one ``python -m sppnet_monai evaluate`` run (its command is printed in the row); each
writes ``OUTPUT_DIR/<row>/metrics.json`` and ``metrics.csv`` with the per-image scores. Prints and
writes ``OUTPUT_DIR/table.md`` (mean ± std over the split's images) and ``table.json``.
``--ablation`` adds the SPPNet row without the instance head's watershed, ``--flip_tta`` the row with flip test-time
augmentation (4x the network time).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from sppnet_monai.evaluate import run_evaluate
from sppnet_monai.predict import UNET_CONFIG

COLUMNS = ("dice", "iou", "dice_256", "iou_256", "aji", "pq", "f1", "clicked_dice")


def rows(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, evaluate arguments) of every row."""
    sppnet = {"checkpoint": args.sppnet} if args.sppnet else {}
    table = [
        ("SPPNet, prompted", {**sppnet, "protocol": "prompted"}),
        ("SPPNet, automatic", {**sppnet, "protocol": "automatic"}),
    ]
    if args.previous:
        table += [
            ("SPPNet, previous release, prompted", {"checkpoint": args.previous, "protocol": "prompted"}),
            ("SPPNet, previous release, automatic", {"checkpoint": args.previous, "protocol": "automatic"}),
        ]
    if args.unet:
        table += [
            ("U-Net, prompted", {"checkpoint": args.unet, "config": UNET_CONFIG, "protocol": "prompted"}),
            ("U-Net, automatic", {"checkpoint": args.unet, "config": UNET_CONFIG, "protocol": "automatic"}),
        ]
    table.append(("hematoxylin + Otsu (no clicks)", {"method": "classical", "protocol": "automatic"}))
    if args.flip_tta:
        table.append(("SPPNet, automatic, + flip TTA", {**sppnet, "protocol": "automatic", "flip_tta": True}))
    if args.ablation:
        table.append(("SPPNet, automatic, mask-only watershed instead of the instance head's", {**sppnet, "protocol": "automatic", "split_by_head": False}))
    return table


def command(dataset_dir: str, output_dir: Path, kwargs: dict) -> str:
    words = [shlex.join(["python", "-m", "sppnet_monai", "evaluate", dataset_dir, "--output_dir", str(output_dir)])]
    for key, value in kwargs.items():
        if isinstance(value, list):  # fire reads a Python list literal
            words.append(f'--{key} "[{",".join(repr(_relative(v)) for v in value)}]"')
        else:
            words.append(shlex.join([f"--{key}", str(value)]))
    return " ".join(words)


def _relative(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def cell(summary: dict, key: str) -> str:
    return f"{summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--sppnet", default=None, help="SPPNet checkpoint (default: the shipped model)")
    parser.add_argument("--previous", default=None, help="another SPPNet checkpoint to compare, e.g. the previous release")
    parser.add_argument("--unet", default=None, help="U-Net baseline model.pt trained with the same recipe")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--ablation", action="store_true", help="add the row without the instance head's watershed")
    parser.add_argument("--flip_tta", action="store_true", help="add the row with flip test-time augmentation")
    args = parser.parse_args()
    out = Path(args.output_dir)
    results, lines = [], []
    header = "| model, protocol | Dice | IoU | Dice 256 | IoU 256 | AJI | PQ | F1 | clicked-nucleus Dice | AJI, PQ (outlined images) |"
    lines += [header, "|" + "---|" * 10]
    for index, (name, kwargs) in enumerate(rows(args)):
        row_dir = out / f"row{index}"
        result = run_evaluate(args.dataset_dir, str(row_dir), split=args.split, **kwargs)
        outlined = result.get("separate_nuclei_images")
        outlined_cell = f"{outlined['aji']['mean']:.3f}, {outlined['pq']['mean']:.3f}" if outlined else "-"
        lines.append(f"| {name} | " + " | ".join(cell(result, key) for key in COLUMNS) + f" | {outlined_cell} |")
        results.append({"row": name, "command": command(args.dataset_dir, row_dir, {"split": args.split, **kwargs}), **result})
    lines += ["", "Commands:", ""] + [f"- {r['row']}: `{r['command']}`" for r in results]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()

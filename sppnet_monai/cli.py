"""``python -m sppnet_monai``: the command-line interface (a ``fire`` CLI).

Each command lives in the module of its concern; this file only wires them together, lists them
(``--help``) and turns :class:`~sppnet_monai.utils.SPPNetError` into one-line messages and its exit status.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import fire

from sppnet_monai.utils import user_error

PROG = "python -m sppnet_monai"
HELP_FLAGS = ("-h", "--help")


class Prepare:
    """Turn a dataset into ``DST/images``, ``DST/labels`` and a MONAI ``DST/datalist.json``."""

    def monuseg(self, src: str, dst: str, test_src: str | None = None, val_fraction: float = 0.2, seed: int = 0):
        """MoNuSeg-2018 as distributed: tif + XML polygons, or tif + binary masks."""
        from sppnet_monai.data.prepare import prepare_monuseg

        return _report(prepare_monuseg(src, dst, test_src=test_src, val_fraction=val_fraction, seed=seed))

    def folder(self, src: str, dst: str, val_fraction: float = 0.2, seed: int = 0):
        """A generic ``SRC/images`` + ``SRC/masks`` folder (binary or instance masks)."""
        from sppnet_monai.data.prepare import prepare_folder

        return _report(prepare_folder(src, dst, val_fraction=val_fraction, seed=seed))

    def demo(self, dst: str, num_images: int = 12, image_size: int = 256, seed: int = 0, val_fraction: float = 0.2):
        """A deterministic synthetic H&E-like dataset, the bundle's embedded default."""
        from sppnet_monai.data.prepare import prepare_demo

        return _report(
            prepare_demo(dst, num_images=num_images, image_size=image_size, seed=seed, val_fraction=val_fraction)
        )


def _report(summary) -> None:
    print(json.dumps(summary, indent=2, default=str))


class Commands:
    """SPPNet for nuclei segmentation: network info, data preparation, prediction."""

    def __init__(self) -> None:
        self.prepare = Prepare()

    def info(
        self,
        image_size: int = 1024,
        fusion: str = "add",
        mask_stride: int = 4,
        instance_head: str | None = None,
        click_head: bool = False,
        residual_units: int = 0,
        mask_scale_units: int = 0,
        conv_embedding: bool = False,
        eighth_skip: bool = False,
        full_resolution_chans: int | None = None,
        click_branch_units: int = 0,
    ) -> None:
        """Print parameter count and multiply-accumulates (GMACs) of SPPNet at ``image_size`` as JSON
        (``--mask_stride 1`` for the native-resolution decoder, ``--residual_units 2`` to deepen its pyramid,
        ``--mask_scale_units 2`` its last stage, ``--conv_embedding True`` to continue it to the embedding,
        ``--eighth_skip True`` to pass its 1/8 level to the decoder, ``--full_resolution_chans 32`` to widen its
        full-resolution level (default: the network's), ``--click_branch_units 2`` to give the click head features of
        its own; the heads add no weights but a product each)."""
        from sppnet_monai.networks.complexity import network_info
        from sppnet_monai.networks.sppnet import SPPNet

        net = SPPNet(
            image_size=image_size,
            fusion=fusion,
            mask_stride=mask_stride,
            instance_head=instance_head,
            click_head=click_head,
            residual_units=residual_units,
            mask_scale_units=mask_scale_units,
            conv_embedding=conv_embedding,
            eighth_skip=eighth_skip,
            click_branch_units=click_branch_units,
            **({} if full_resolution_chans is None else {"full_resolution_chans": full_resolution_chans}),
        )
        _report(network_info(net, image_size=image_size))

    def benchmark(
        self,
        image_size: int = 1024,
        repeats: int = 5,
        sam_vit_h: bool = False,
        threads: int | None = None,
        train_crop: int = 256,
        train_batch: int = 4,
    ) -> None:
        """Time SPPNet (per image, per extra click, training) and SAM ViT-B (ViT-H with --sam_vit_h) as JSON."""
        from sppnet_monai.benchmark import run_benchmark

        _report(run_benchmark(image_size, train_crop, train_batch, repeats, sam_vit_h=sam_vit_h, threads=threads))

    def evaluate(
        self,
        dataset_dir: str,
        output_dir: str = "eval",
        checkpoint: str | None = None,
        split: str = "validation",
        protocol: str = "prompted",
        prompt_draws: int = 1,
        overlays: bool = False,
        seed: int = 0,
        config: str | list | None = None,
        method: str = "network",
        **overrides,
    ) -> None:
        """Dice/IoU (native and 256x256), AJI, PQ and F1 of a checkpoint on a prepared split.

        ``--protocol prompted`` (a ground-truth click in every window, the paper's protocol) or
        ``automatic`` (the clicks ``predict`` chooses). ``--checkpoint`` defaults to the inference
        config's (the shipped MoNuSeg model); the network is built from the recipe the checkpoint
        records. ``--config "['bundle/configs/inference.json','bundle/configs/unet_inference.json']"``
        scores the U-Net baseline, ``--method classical`` the hematoxylin + Otsu baseline. Writes
        OUTPUT_DIR/metrics.json and metrics.csv; ``--overlays`` adds pictures, ``--prompt_draws N`` the
        spread of Dice over N random prompt draws (with a violin plot).
        """
        from sppnet_monai.evaluate import run_evaluate
        from sppnet_monai.predict import DEFAULT_CONFIG

        _report(
            run_evaluate(
                dataset_dir, output_dir, checkpoint, split, protocol, prompt_draws, overlays, seed, config or DEFAULT_CONFIG, method, **overrides
            )
        )

    def release(self, checkpoint: str, output: str, command: str = "", data: str = "", license: str = "") -> None:
        """Write a trained SPPNet as a shippable file: float16 weights, its recipe and where it came from.

        ``--command`` (how it was trained), ``--data`` (what it was trained on) and ``--license`` (the
        terms the training data puts on the weights) are stored in the file (``_extra_state.release``).
        """
        from sppnet_monai.networks.checkpoints import save_release

        provenance = {"command": command, "data": data, "license": license, "source": Path(checkpoint).name}
        release = save_release(checkpoint, output, provenance)
        _report({"output": output, "bytes": Path(output).stat().st_size, **release})

    def predict(
        self,
        inputs: str,
        output_dir: str,
        checkpoint: str | None = None,
        clicks: str | None = None,
        formats: str = "png",
        config: str | None = None,
        region: str | None = None,
        level: int = 0,
        tile_size: int | None = None,
        **overrides,
    ) -> None:
        """Nuclei masks and instance maps for images or folders; nuclei polygons for whole-slide images.

        Clicks come from ``--clicks`` (JSON or CSV, see the README) or are chosen automatically;
        ``--formats png,tif,nii`` (masks of plain images) and/or ``geojson`` (QuPath GeoJSON + CSV of the
        nuclei, for any input; the only output for slides). Slides (anything OpenSlide reads) go tile by
        tile: ``--region x,y,w,h`` (level-0 pixels, default the whole slide) read at ``--level``, in tiles of
        ``--tile_size`` pixels (default: the config's ``slide_inference``).
        ``--checkpoint`` defaults to the inference config's; other ``--id value`` pairs override the
        inference config (e.g. ``--threshold 0.4``; ``image_size`` comes from the checkpoint). Under
        ``torchrun`` the inputs are shared out between the processes.
        """
        from sppnet_monai.predict import DEFAULT_CONFIG, ImagesFailed, run_predict

        formats = formats.split(",") if isinstance(formats, str) else list(formats)
        if isinstance(region, tuple):  # fire parses 1,2,3,4 as a tuple
            region = ",".join(str(v) for v in region)
        summary = run_predict(inputs, output_dir, checkpoint, clicks, formats, config or DEFAULT_CONFIG, region, level, tile_size, **overrides)
        if int(os.environ.get("RANK", "0")) == 0:  # one report for a torchrun job
            _report(summary)
            if summary["failed"]:  # the others' outputs are written, but a script must see that some are missing
                raise ImagesFailed(summary["failed"], len(summary["images"]) + len(summary["failed"]))


def _summary(member: object) -> str:
    """The first line of ``member``'s docstring, without reST's double backquotes."""
    return (inspect.getdoc(member) or "").split("\n", 1)[0].replace("``", "")


def _command_rows(commands: object, prefix: str = "") -> list[tuple[str, str]]:
    """``(command, summary)`` of ``commands``' public methods in the order they are written, then of its groups'
    (public attributes: ``prepare``) as ``group command``."""
    rows = [(prefix + name, _summary(member)) for name, member in vars(type(commands)).items() if not name.startswith("_") and callable(member)]
    for name, group in vars(commands).items():
        if not name.startswith("_"):
            rows += _command_rows(group, f"{prefix}{name} ")
    return rows


def usage() -> str:
    """What ``python -m sppnet_monai --help`` prints: every command with its one-line summary."""
    rows = _command_rows(Commands())
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [f"usage: {PROG} COMMAND [ARGS] [--FLAG VALUE ...]", "", _summary(Commands), "", "commands:"]
        + [f"  {name:<{width}}  {summary}" for name, summary in rows]
        + ["", f"'{PROG} COMMAND --help' describes a command's arguments."]
    )


def _command_path(argv: list[str]) -> list[str]:
    """The leading words of ``argv`` that name a command or group (``["prepare", "demo"]``)."""
    component: object = Commands()
    path: list[str] = []
    for word in argv:
        member = None if word.startswith("_") else getattr(component, word, None)
        if member is None:
            break
        path.append(word)
        component = member
    return path


def main(argv: list[str] | None = None) -> None:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); ``--help``/``-h`` or nothing lists the commands."""
    argv = sys.argv[1:] if argv is None else list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    if any(arg in HELP_FLAGS for arg in argv[:end]):
        # In front of fire's "--", predict and evaluate would take --help as a config override (their **overrides)
        # and run; behind it, fire shows the command's help. With no command named: the listing.
        path = _command_path(argv)
        argv = path + ["--", "--help"] if path else []
    if not argv:
        print(usage())
        return
    try:
        fire.Fire(Commands(), command=argv, name=PROG)
    except Exception as err:  # MONAI's config parser wraps the user's error in its own
        cause = user_error(err)
        if cause is None:
            raise
        for line in str(cause).splitlines():  # one line; ImagesFailed: one for each image
            print(f"error: {line}", file=sys.stderr)
        sys.exit(cause.exit_status)

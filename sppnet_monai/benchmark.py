"""``python -m sppnet_monai benchmark``: speed and size of SPPNet against SAM, measured in one process.

Every figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones, on the same
machine and in the same process, so the ratios compare like with like.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from sppnet_monai.networks import RECIPE_KEYS, SPPNet
from sppnet_monai.networks.complexity import count_macs, network_info
from sppnet_monai.precision import autocast, cpu_has_bf16
from sppnet_monai.workflows.setup import reuse_freed_memory

__all__ = ["run_benchmark", "time_call"]


def time_call(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _SamEndToEnd(nn.Module):
    """SAM's image encoder, prompt encoder and mask decoder on one image and one point prompt."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam
        self.in_channels = 3

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        embedding = self.sam.image_encoder(image)
        coords = torch.tensor([[[512.0, 512.0], [10.0, 10.0]]], device=image.device)
        labels = torch.tensor([[1, 0]], device=image.device)
        sparse, dense = self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, _ = self.sam.mask_decoder(embedding, self.sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        return masks


def _sam_figures(variant: str, repeats: int, warmup: int, with_macs: bool) -> dict:
    from segment_anything import sam_model_registry

    model = _SamEndToEnd(sam_model_registry[variant]()).eval()
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        seconds = time_call(lambda: model(image), repeats, warmup)
    figures = {"seconds_per_image": seconds, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}
    if with_macs:
        figures["gmacs"] = count_macs(model, image) / 1e9
    return figures


def _sppnet_input(image_size: int) -> torch.Tensor:
    image = torch.randn(1, 5, image_size, image_size)
    image[:, 3:] = 0.0
    image[0, 3, image_size // 2, image_size // 2] = 1.0
    image[0, 4, 5, 5] = 1.0
    return image


def run_benchmark(
    image_size: int = 1024,
    train_crop: int = 256,
    train_batch: int = 4,
    repeats: int = 5,
    warmup: int = 2,
    sam_vit_h: bool = False,
    sam_repeats: int = 2,
    threads: int | None = None,
) -> dict:
    """Measure SPPNet and SAM; returns the JSON-ready report (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "method": (
            f"median of timed runs after untimed warm-up runs: per image {repeats} after {warmup}, per extra click "
            f"{repeats * 4} after {warmup}, training {max(2, repeats // 2)} after 1, SAM {sam_repeats} after 1; "
            "'straightforward' is the plain network under the C library's default allocator, every other figure "
            "(SAM's too) runs after reuse_freed_memory(), as predict, evaluate, the bundle and MONAI Label do"
        ),
    }
    net = SPPNet(image_size=image_size).eval()
    image = _sppnet_input(image_size)
    fast = copy.deepcopy(net).optimize_for_inference()  # what predict, evaluate and the bundle's inference run
    with torch.no_grad():
        straightforward = time_call(lambda: net(image), repeats, warmup)
    report["machine"]["reuse_freed_memory"] = reuse_freed_memory()
    end_to_end, extra_click = _inference_speed(fast, repeats, warmup)
    report["sppnet"] = {
        "image_size": image_size,
        "seconds_per_image": end_to_end,
        "seconds_per_image_straightforward": straightforward,
        "images_per_second": 1.0 / end_to_end,
        "seconds_per_extra_click_cached_embedding": extra_click,
        "parameters_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "gmacs": network_info(net, image_size)["gmacs"],
    }
    # A model trained by the fast CPU recipe runs (and MONAI Label serves it) in windows of the crop size.
    window_image, window_click = _inference_speed(SPPNet(image_size=train_crop).optimize_for_inference(), repeats, warmup)
    report["sppnet_at_train_crop"] = {
        "image_size": train_crop,
        "seconds_per_image": window_image,
        "seconds_per_extra_click_cached_embedding": window_click,
    }
    report["sppnet_training"] = _training_speed(train_crop, train_batch, max(2, repeats // 2), 1)
    report["precision"] = _precision_figures(train_crop, train_batch, repeats, warmup)
    report["sam_vit_b"] = _sam_figures("vit_b", sam_repeats, 1, with_macs=True)
    if sam_vit_h:
        report["sam_vit_h"] = _sam_figures("vit_h", sam_repeats, 1, with_macs=True)
    report["ratios"] = {"straightforward_over_optimized_seconds": straightforward / end_to_end} | {
        f"{name}_over_sppnet_seconds": report[name]["seconds_per_image"] / end_to_end
        for name in ("sam_vit_b", "sam_vit_h")
        if name in report
    } | {
        f"{name}_over_sppnet_parameters": report[name]["parameters_M"] / report["sppnet"]["parameters_M"]
        for name in ("sam_vit_b", "sam_vit_h")
        if name in report
    } | {
        f"{name}_over_sppnet_gmacs": report[name]["gmacs"] / report["sppnet"]["gmacs"]
        for name in ("sam_vit_b", "sam_vit_h")
        if name in report
    }
    return report


def native_recipe() -> dict:
    """The network settings of ``native_cpu.json``, the shipped recipe (the benchmark measures that network)."""
    from sppnet_monai.predict import DEFAULT_CONFIG

    recipe = json.loads((DEFAULT_CONFIG.parent / "native_cpu.json").read_text())
    return {key: recipe[key] for key in RECIPE_KEYS if key in recipe}


def _precision_figures(crop: int, batch: int, repeats: int, warmup: int) -> dict:
    """The native-resolution network of ``native_cpu.json`` (:func:`native_recipe`) at ``crop`` in float32 and
    under bfloat16 autocast (the bundles' ``cpu_bf16``): per window, per extra click and per training step;
    bf16 only where the CPU has bfloat16 units."""
    native = native_recipe()
    figures: dict = {"cpu_has_bf16": cpu_has_bf16(), "network": {"image_size": crop, **native}}
    for name, bf16 in (("float32", False), ("bfloat16", True)):
        if bf16 and not cpu_has_bf16():
            break
        torch.manual_seed(0)
        window, click = _inference_speed(SPPNet(image_size=crop, **native).optimize_for_inference(), repeats, warmup, bf16)
        figures[name] = {
            "seconds_per_window": window,
            "seconds_per_extra_click_cached_embedding": click,
            "training": _training_speed(crop, batch, max(2, repeats // 2), 1, bf16, **native),
        }
    if "bfloat16" in figures:
        f32, b16 = figures["float32"], figures["bfloat16"]
        figures["float32_over_bfloat16_seconds"] = {
            "window": f32["seconds_per_window"] / b16["seconds_per_window"],
            "extra_click": f32["seconds_per_extra_click_cached_embedding"] / b16["seconds_per_extra_click_cached_embedding"],
            "training_step": f32["training"]["seconds_per_step"] / b16["training"]["seconds_per_step"],
        }
    return figures


@torch.no_grad()
def _inference_speed(net: SPPNet, repeats: int, warmup: int, bf16: bool = False) -> tuple[float, float]:
    """Seconds per image end to end, and per extra click decoded against the cached embedding (``bf16``: under CPU autocast)."""
    size = net.image_size
    image = _sppnet_input(size)

    def run(fn: Callable[[], object]) -> Callable[[], object]:
        def timed() -> object:
            with autocast("cpu", cpu_bf16=bf16):
                return fn()

        return timed

    end_to_end = time_call(run(lambda: net(image)), repeats, warmup)
    with autocast("cpu", cpu_bf16=bf16):
        features = net.encode(image[:, :3])
    coords = torch.tensor([[[size / 2, size / 3], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0]])
    extra_click = time_call(run(lambda: net.decode(features, coords, labels)), repeats * 4, warmup)
    return end_to_end, extra_click


def _training_speed(crop: int, batch: int, repeats: int, warmup: int, bf16: bool = False, **network: object) -> dict:
    """Training samples per second at ``crop`` (Dice loss, Adam), as the fast CPU recipe trains (``bf16``: under CPU autocast)."""
    from monai.losses import DiceLoss

    net = SPPNet(image_size=crop, **network).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DiceLoss(sigmoid=True)
    images = torch.cat([_sppnet_input(crop)] * batch)
    labels = (torch.rand(batch, 1, crop, crop) > 0.7).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", cpu_bf16=bf16):
            logits = net(images)
        loss_fn(logits[:, :1].float(), labels).backward()
        optimizer.step()

    seconds = time_call(step, repeats, warmup)
    return {"crop": crop, "batch": batch, "seconds_per_step": seconds, "samples_per_second": batch / seconds}

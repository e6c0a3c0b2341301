"""The benchmark CLI on a tiny input: every figure and ratio present, measured (positive) and consistent."""

from __future__ import annotations

import json

import pytest

from sppnet_monai import benchmark
from sppnet_monai.cli import main

ARGS = ["benchmark", "--image_size", "64", "--repeats", "1", "--train_crop", "64", "--train_batch", "1"]


def _check_sppnet_figures(report: dict) -> None:
    sppnet = report["sppnet"]
    for key in ("seconds_per_image", "seconds_per_image_straightforward", "seconds_per_extra_click_cached_embedding"):
        assert sppnet[key] > 0, key
    assert report["sppnet_training"]["samples_per_second"] > 0
    window = report["sppnet_at_train_crop"]
    assert window["image_size"] == 64 and window["seconds_per_image"] > window["seconds_per_extra_click_cached_embedding"] > 0
    assert report["ratios"]["straightforward_over_optimized_seconds"] > 0
    assert report["machine"]["torch_threads"] >= 1
    precision = report["precision"]
    assert precision["network"]["mask_stride"] == 1 and precision["float32"]["seconds_per_window"] > 0
    assert precision["float32"]["training"]["seconds_per_step"] > 0
    if precision["cpu_has_bf16"]:  # both precisions, and their ratio, on a CPU with bfloat16 units
        assert precision["float32_over_bfloat16_seconds"]["training_step"] == (
            precision["float32"]["training"]["seconds_per_step"] / precision["bfloat16"]["training"]["seconds_per_step"]
        )


def test_benchmark_cli_reports_every_sppnet_figure(capsys, monkeypatch):
    """SPPNet's figures, and the ratios' arithmetic, with SAM's figures stubbed (SAM ViT-B runs in the slow test)."""
    calls = []

    def fake_sam_figures(variant: str, repeats: int, warmup: int, with_macs: bool) -> dict:
        calls.append(variant)
        return {"seconds_per_image": 3.0, "parameters_M": 93.7, "gmacs": 500.0}

    monkeypatch.setattr(benchmark, "_sam_figures", fake_sam_figures)
    main(ARGS)
    report = json.loads(capsys.readouterr().out)
    _check_sppnet_figures(report)
    assert calls == ["vit_b"]
    ratios, sppnet = report["ratios"], report["sppnet"]
    assert ratios["sam_vit_b_over_sppnet_seconds"] == 3.0 / sppnet["seconds_per_image"]
    assert ratios["sam_vit_b_over_sppnet_parameters"] == 93.7 / sppnet["parameters_M"]
    assert ratios["sam_vit_b_over_sppnet_gmacs"] == 500.0 / sppnet["gmacs"]


@pytest.mark.slow
def test_benchmark_cli_reports_sam_vit_b(capsys):
    """The full benchmark, SAM ViT-B (93.7M parameters, at 1024x1024) included."""
    main(ARGS)
    report = json.loads(capsys.readouterr().out)
    _check_sppnet_figures(report)
    sam, sppnet, ratios = report["sam_vit_b"], report["sppnet"], report["ratios"]
    assert sam["parameters_M"] > 80 and sam["seconds_per_image"] > 0 and sam["gmacs"] > 0
    assert ratios["sam_vit_b_over_sppnet_seconds"] == sam["seconds_per_image"] / sppnet["seconds_per_image"]
    assert ratios["sam_vit_b_over_sppnet_parameters"] > 5

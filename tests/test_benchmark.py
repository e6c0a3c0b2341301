"""The benchmark CLI on a tiny input: every figure and ratio present, measured (positive) and consistent."""

from __future__ import annotations

import json

from sppnet_monai.cli import main


def test_benchmark_cli_reports_every_figure(capsys):
    main(["benchmark", "--image_size", "64", "--repeats", "1", "--train_crop", "64", "--train_batch", "1"])
    report = json.loads(capsys.readouterr().out)
    sppnet = report["sppnet"]
    for key in ("seconds_per_image", "seconds_per_image_straightforward", "seconds_per_extra_click_cached_embedding"):
        assert sppnet[key] > 0, key
    assert report["sppnet_training"]["samples_per_second"] > 0
    window = report["sppnet_at_train_crop"]
    assert window["image_size"] == 64 and window["seconds_per_image"] > window["seconds_per_extra_click_cached_embedding"] > 0
    assert report["sam_vit_b"]["parameters_M"] > 80  # SAM ViT-B: 93.7M
    ratios = report["ratios"]
    assert ratios["sam_vit_b_over_sppnet_seconds"] == report["sam_vit_b"]["seconds_per_image"] / sppnet["seconds_per_image"]
    assert ratios["sam_vit_b_over_sppnet_parameters"] > 5
    assert report["machine"]["torch_threads"] >= 1

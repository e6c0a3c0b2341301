"""The MONAI Label app's check of /train parameters (``monailabel_app/lib/train.py``), without a server.

Skipped unless the ``monailabel`` pip package is installed (``lib.train`` subclasses its TrainTask).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("monailabel")

APP = Path(__file__).resolve().parents[1] / "monailabel_app"


@pytest.fixture
def train(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    import lib.train

    return lib.train


def test_values_are_typed_and_unset_ones_left_out(train):
    request = {"model": "sppnet", "max_epochs": "3", "val_interval": 2.0, "learning_rate": "1e-4", "image_size": 64, "batch_size": None, "crops_per_image": ""}
    overrides = train.train_overrides(request)
    assert overrides == {"max_epochs": 3, "val_interval": 2, "learning_rate": 1e-4, "image_size": 64}
    assert all(type(overrides[key]) is int for key in ("max_epochs", "val_interval", "image_size"))


@pytest.mark.parametrize(
    "key, value",
    [("max_epochs", 0), ("max_epochs", -2), ("max_epochs", 1.5), ("max_epochs", "ten"), ("max_epochs", True), ("max_epochs", [1]),
     ("val_interval", math.inf), ("batch_size", "nan"), ("learning_rate", 0), ("learning_rate", "fast"), ("image_size", 100), ("image_size", 32)],
)
def test_a_bad_value_is_refused_by_name(train, key, value):
    with pytest.raises(train.TrainRequestError, match=key):
        train.train_overrides({key: value})


def test_val_interval_above_max_epochs_is_lowered_so_the_run_writes_a_model(train):
    configured = train.SPPNetTrain(str(APP.parent / "bundle"), ["fast_cpu.json"], {}).configured()
    assert configured["max_epochs"] == 60 and configured["val_interval"] == 2  # fast_cpu.json over train.json
    overrides = {"max_epochs": 1}
    assert "validating at epoch 1" in train.validate_by_last_epoch(overrides, configured)
    assert overrides == {"max_epochs": 1, "val_interval": 1}
    overrides = {"max_epochs": 3, "val_interval": 4}
    assert "val_interval 4 is more than max_epochs 3" in train.validate_by_last_epoch(overrides, configured)
    assert overrides["val_interval"] == 3
    for unchanged in ({}, {"max_epochs": 2}, {"max_epochs": 5, "val_interval": 5}):
        assert train.validate_by_last_epoch(dict(unchanged), configured) is None

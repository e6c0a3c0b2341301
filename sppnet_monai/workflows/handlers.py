"""Ignite handlers the bundle adds to MONAI's: resuming, learning rate and prompt overlays in TensorBoard."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import convert_to_numpy
from torch.utils.tensorboard import SummaryWriter

from sppnet_monai.visualize import prompt_overlay

logger = logging.getLogger(__name__)

_EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> Optional[Path]:
    """The ``checkpoint_epoch=N.pt`` with the highest N in ``ckpt_dir`` (what ``CheckpointSaver`` writes)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt") if (m := _EPOCH_CHECKPOINT.search(p.name))]
    return max(found)[1] if found else None


class ResumableTrainingState:
    """Save the training state after every epoch and resume from the latest save on the next run.

    The state is ``save_dict`` (network, optimizer, scheduler, ...) plus the trainer itself (epoch
    and iteration counters), added when attached so that the config needs no self-reference.
    MONAI's :class:`CheckpointSaver` writes ``ckpt_dir/checkpoint_epoch=N.pt`` (the last one kept);
    MONAI's :class:`CheckpointLoader` restores it before the first epoch of a rerun. In distributed
    runs every rank resumes but only one (``save=True``) writes.
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: Mapping[str, object],
        map_location: str | torch.device | None = None,
        save: bool = True,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.save_dict = dict(save_dict)
        self.map_location = map_location
        self.save = save

    def attach(self, engine: Engine) -> None:
        state = {**self.save_dict, "trainer": engine}
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("no checkpoint in %s: training starts at epoch 1", self.ckpt_dir)
        else:
            logger.info("resuming from %s", path)
            CheckpointLoader(load_path=str(path), load_dict=state, map_location=self.map_location).attach(engine)
        if self.save:
            CheckpointSaver(save_dir=self.ckpt_dir, save_dict=state, save_interval=1, n_saved=1, epoch_level=True).attach(engine)


class LearningRateTensorBoardHandler:
    """Write the learning rate of each optimizer parameter group to TensorBoard after every epoch."""

    def __init__(self, summary_writer: SummaryWriter, optimizer: torch.optim.Optimizer, tag: str = "learning_rate") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            tag = self.tag if index == 0 else f"{self.tag}/group{index}"
            self.writer.add_scalar(tag, group["lr"], engine.state.epoch)


class PromptOverlayTensorBoardHandler:
    """Write image + clicks + predicted and ground-truth outlines of the first validation batch to TensorBoard.

    Attach to the evaluator: MONAI's ``ValidationHandler`` runs it with the trainer's epoch, the step used here.
    """

    def __init__(
        self,
        summary_writer: SummaryWriter,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        max_images: int = 2,
        tag: str = "val_prompt_overlay",
    ) -> None:
        self.writer = summary_writer
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.max_images = max_images
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration != 1:  # one picture per validation run
            return
        step = engine.state.epoch
        for index, sample in enumerate(engine.state.output[: self.max_images]):
            picture = prompt_overlay(
                convert_to_numpy(sample["image"]),
                convert_to_numpy(sample["pred"]),
                convert_to_numpy(sample["label"]),
                self.pixel_mean,
                self.pixel_std,
            )
            self.writer.add_image(f"{self.tag}/{index}", picture, step, dataformats="HWC")

"""Ignite handlers the bundle adds to MONAI's: resuming, weight averaging, reseeded validation, learning rate and prompt overlays in TensorBoard."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from ignite.engine import Engine, Events
from timm.utils import ModelEmaV3
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.transforms import Randomizable
from monai.utils import convert_to_numpy
from torch.utils.tensorboard import SummaryWriter

from sppnet_monai.networks.checkpoints import with_recipe_defaults
from sppnet_monai.utils import SPPNetError
from sppnet_monai.visualize import prompt_overlay

logger = logging.getLogger(__name__)

# Training settings a checkpoint's recipe may predate, at the value every run had before the setting existed
# (strings, as _Recipe saves them); the network's own settings get theirs from with_recipe_defaults.
TRAINING_RECIPE_DEFAULTS = {"transformer_lr_factor": "1.0", "ema_decay": "0.0"}

_EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> Optional[Path]:
    """The ``checkpoint_epoch=N.pt`` with the highest N in ``ckpt_dir`` (what ``CheckpointSaver`` writes)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt") if (m := _EPOCH_CHECKPOINT.search(p.name))]
    return max(found)[1] if found else None


class _HandlerState:
    """``state_dict``/``load_state_dict`` for the part of a MONAI handler that must survive a resume.

    MONAI's :class:`CheckpointSaver` keeps its best-so-far list in an ignite ``Checkpoint`` and
    :class:`EarlyStopHandler` its counter in an ignite ``EarlyStopping``; both are stateful but the
    MONAI wrappers expose neither, so the state is reached through them at save/load time.
    """

    def __init__(self, handler: object) -> None:
        self.handler = handler

    def _stateful(self):
        if isinstance(self.handler, CheckpointSaver):
            return self.handler._key_metric_checkpoint
        if isinstance(self.handler, EarlyStopHandler):
            return self.handler._handler  # created by set_trainer(), before the run starts
        raise TypeError(f"no resumable state known for {type(self.handler).__name__}")

    def state_dict(self) -> dict:
        stateful = self._stateful()
        return dict(stateful.state_dict()) if stateful is not None else {}

    def load_state_dict(self, state_dict: Mapping) -> None:
        stateful = self._stateful()
        if stateful is not None and state_dict:
            stateful.load_state_dict(state_dict)


class _Recipe:
    """The settings a checkpoint was trained with, saved beside it so a resume cannot mix recipes."""

    def __init__(self, recipe: Mapping[str, object]) -> None:
        self.recipe = {key: str(value) for key, value in recipe.items()}

    def state_dict(self) -> dict:
        return dict(self.recipe)

    def load_state_dict(self, state_dict: Mapping) -> None:
        pass  # checked in ResumableTrainingState.attach, before training starts


class ResumableTrainingState:
    """Save the training state after every epoch and resume from the latest save on the next run.

    The state is ``save_dict`` (network, optimizer, scheduler, ...), the trainer itself (epoch and
    iteration counters, added when attached so that the config needs no self-reference), the
    validation handlers' memory in ``validation_state`` (best-model saver, early stopping: without
    it a resumed run would overwrite ``model.pt`` with a worse model) and ``recipe``, the settings
    that make checkpoints incompatible (dataset, network): a checkpoint from another recipe stops
    the run with one line instead of silently continuing it.

    MONAI's :class:`CheckpointSaver` writes ``ckpt_dir/checkpoint_epoch=N.pt`` atomically (the last
    one kept); MONAI's :class:`CheckpointLoader` restores it before the first epoch of a rerun.
    Attach it after the other trainer handlers so the save follows validation and the scheduler
    step of the same epoch. In distributed runs every rank resumes but only one (``save=True``) writes.
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: Mapping[str, object],
        validation_state: Mapping[str, object] | None = None,
        recipe: Mapping[str, object] | None = None,
        map_location: str | torch.device | None = None,
        save: bool = True,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        # None stands for a part switched off in this recipe (no weight average): nothing to save or load.
        self.save_dict = {key: value for key, value in save_dict.items() if value is not None}
        self.validation_state = {key: _HandlerState(handler) for key, handler in (validation_state or {}).items()}
        self.recipe = _Recipe(recipe or {})
        self.map_location = map_location
        self.save = save

    def check_recipe(self, path: Path) -> None:
        """Raise :class:`SPPNetError` when ``path`` was trained with settings other than this run's."""
        try:
            # Memory-mapped: only the small recipe is read here; CheckpointLoader loads the tensors once, later.
            saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("recipe", {})
        except Exception as err:
            raise SPPNetError(f"{path}: cannot be read to resume from ({err}); delete it or use another bundle_root") from err
        # A network setting added since that run was saved: the run had its default (strings, as _Recipe saves them).
        saved = {key: str(value) for key, value in with_recipe_defaults(saved).items()}
        saved = {**TRAINING_RECIPE_DEFAULTS, **saved} if saved else saved
        changed = [f"{key} {saved[key]!r} -> {value!r}" for key, value in self.recipe.recipe.items() if key in saved and saved[key] != value]
        if changed:
            raise SPPNetError(
                f"{path}: written by another training recipe ({', '.join(changed)}); "
                "use a fresh bundle_root or remove its models/ to start over"
            )

    def attach(self, engine: Engine) -> None:
        state = {**self.save_dict, **self.validation_state, "recipe": self.recipe, "trainer": engine}
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.info("no checkpoint in %s: training starts at epoch 1", self.ckpt_dir)
        else:
            self.check_recipe(path)
            logger.info("resuming from %s", path)
            CheckpointLoader(load_path=str(path), load_dict=state, map_location=self.map_location).attach(engine)
        if self.save:
            CheckpointSaver(save_dir=self.ckpt_dir, save_dict=state, save_interval=1, n_saved=1, epoch_level=True).attach(engine)


class WeightAverage:
    """An exponential moving average of the training network's parameters (timm's :class:`ModelEmaV3`),
    updated after every optimizer step; ``network`` is what validation scores and ``model.pt`` keeps.
    Buffers (batch-norm statistics) are copied from the training network: they already average recent
    batches, and SPPNet's state holds its recipe, which cannot be averaged.

    ``decay`` is per iteration; its warm-up (``1 - (1 + step) ** -warmup_power``, capped at ``decay``)
    keeps the first steps from being averaged with the random initial weights. ``decay`` 0 switches it
    off: ``network`` is then the training network itself and ``average`` is None.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.0, warmup_power: float = 1.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise SPPNetError(f"ema_decay {decay!r}: must be in [0, 1), 0 to train without a weight average")
        # A DistributedDataParallel wrapper is not copied: every rank averages its own (identical) module.
        self.source = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
        self.average = ModelEmaV3(
            self.source, decay=decay, use_warmup=True, warmup_power=warmup_power, exclude_buffers=True) if decay > 0 else None

    @property
    def network(self) -> torch.nn.Module:
        return self.source if self.average is None else self.average.module

    def attach(self, engine: Engine) -> None:
        if self.average is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.average.update(self.source, step=engine.state.iteration)


class ReseedRandomTransforms:
    """Reseed a transform's random draws at the start of every run of the engine it is attached to.

    On the evaluator this makes every validation see the same clicks, so the Dice curve (and the
    choice of the best model) reflects the network and not the luck of a click draw. It acts on the
    transforms of the main process: keep the validation data loader at ``num_workers=0``.
    """

    def __init__(self, transform: Randomizable, seed: int = 0) -> None:
        self.transform = transform
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.transform.set_random_state(seed=self.seed)


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
        max_images: int = 2,
        tag: str = "val_prompt_overlay",
    ) -> None:
        self.writer = summary_writer
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
            )
            self.writer.add_image(f"{self.tag}/{index}", picture, step, dataformats="HWC")

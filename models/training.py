"""The one training loop of every gradient-trained model: epochs over mini-batches, validation, early
stopping, LR schedule on plateau, gradient clipping, a NaN guard, a progress bar and per-epoch callbacks.

A module takes part by implementing `configure_optimizers`, `training_step(batch, ctx)` and
`validation_step(batch, ctx)`. `training_step` calls `ctx.optimize(loss, i)` once per parameter update
(a WGAN calls it for the critic and the generator; a DBM with its contrastive surrogate loss), so clipping,
the NaN guard and stepping live here, written once.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from scdgm.errors import ScdgmError
from scdgm.models.base import EpochCallback, TrainingHistory
from scdgm.models.data import Batch, CountBatches


class TrainingDiverged(ScdgmError):
    """A loss or gradient became NaN/inf: training stops with this clear error instead of saving garbage."""


class StopTraining(Exception):
    """Raised by an epoch callback to end training early (e.g. ASHA pruning); the best state is kept."""


@dataclass
class LoopConfig:
    """Settings of the loop itself (model hyperparameters live in each model's Config)."""

    max_epochs: int = 100
    min_epochs: int = 0
    """Epochs of warm-up (e.g. a KL weight still rising): no best state, no early stop, no LR step before them."""
    patience: int = 10
    min_delta: float = 0.0
    lr_patience: int = 5
    lr_factor: float = 0.5
    grad_clip: float | None = 10.0
    monitor: str = "validation_loss"
    progress: bool = True
    description: str = "training"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU training is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepContext:
    """What a module's step sees: the epoch, training progress in [0, 1], and `optimize` for updates."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], config: LoopConfig, max_epochs: int) -> None:
        self.optimizers = list(optimizers)
        self.config = config
        self.max_epochs = max_epochs
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_per_epoch = 1

    @property
    def progress(self) -> float:
        """Fraction of training done, e.g. for KL warm-up as a fraction of the epochs."""
        done = self.epoch + self.step_in_epoch / max(self.steps_per_epoch, 1)
        return min(done / max(self.max_epochs, 1), 1.0)

    def optimize(self, loss: torch.Tensor, optimizer_index: int = 0) -> None:
        """Backpropagate `loss`, check for NaN, clip gradients and step optimizer `optimizer_index`."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {self.epoch + 1}; lower the learning rate or check the input"
            )
        optimizer = self.optimizers[optimizer_index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.config.grad_clip is not None and params:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            if not torch.isfinite(norm):
                raise TrainingDiverged(f"gradient norm became {norm.item()} at epoch {self.epoch + 1}")
        optimizer.step()


class TrainableModule(Protocol):
    """The torch module side of a model, as the loop drives it."""

    def configure_optimizers(self) -> list[torch.optim.Optimizer]: ...

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]: ...

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]: ...

    def train(self, mode: bool = True) -> torch.nn.Module: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> object: ...


def _mean_metrics(totals: dict[str, float], count: int, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v / max(count, 1) for k, v in totals.items()}


def _run_epoch(module: TrainableModule, batches: CountBatches, ctx: StepContext, training: bool) -> dict[str, float]:
    """Average each reported term over cells (steps report per-cell means; weights are batch sizes)."""
    totals: dict[str, torch.Tensor] = {}
    cells = 0
    module.train(training)
    ctx.steps_per_epoch = len(batches)
    for step, batch in enumerate(batches):
        ctx.step_in_epoch = step
        if training:
            logs = module.training_step(batch, ctx)
        else:
            with torch.no_grad():
                logs = module.validation_step(batch, ctx)
        size = batch.x.shape[0]
        for key, value in logs.items():  # summed as tensors: no host sync per step (matters on a GPU)
            totals[key] = totals.get(key, 0.0) + torch.as_tensor(value).detach().double() * size
        cells += size
    sums = {key: float(total) for key, total in totals.items()}
    for key, value in sums.items():
        if not math.isfinite(value):
            raise TrainingDiverged(f"{key} became {value} in epoch {ctx.epoch + 1}")
    return _mean_metrics(sums, cells, "train" if training else "validation")


def fit_module(
    module: TrainableModule,
    train_batches: CountBatches,
    validation_batches: CountBatches | None,
    config: LoopConfig,
    callbacks: Sequence[EpochCallback] = (),
) -> TrainingHistory:
    """Train `module` in place and leave it at its best epoch on the monitored metric; returns the history.

    Without validation cells, the monitored metric falls back to the training loss of the same name.
    """
    optimizers = module.configure_optimizers()
    schedulers = [
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=config.lr_factor, patience=config.lr_patience)
        for opt in optimizers
    ]
    ctx = StepContext(optimizers, config, config.max_epochs)
    history = TrainingHistory()
    best_value, best_state, waited = math.inf, None, 0
    monitor = config.monitor if validation_batches is not None else config.monitor.replace("validation_", "train_")
    started = time.perf_counter()
    bar = tqdm(range(config.max_epochs), desc=config.description, disable=not config.progress, leave=False)
    try:
        for epoch in bar:
            ctx.epoch = epoch
            metrics = _run_epoch(module, train_batches, ctx, training=True)
            if validation_batches is not None:
                metrics.update(_run_epoch(module, validation_batches, ctx, training=False))
            if monitor not in metrics:
                raise ScdgmError(f"monitored metric {monitor!r} not reported; got {sorted(metrics)}")
            metrics["lr"] = optimizers[0].param_groups[0]["lr"]
            metrics["epoch"] = epoch
            history.epochs.append(metrics)
            value = metrics[monitor]
            if epoch < config.min_epochs:
                pass  # the objective still changes with the schedule: no epoch of the warm-up is a candidate
            elif value < best_value - config.min_delta:
                best_value, waited, history.best_epoch = value, 0, epoch
                best_state = copy.deepcopy(module.state_dict())
            else:
                waited += 1
            if epoch >= config.min_epochs:
                for scheduler in schedulers:
                    scheduler.step(value)
            bar.set_postfix({monitor: f"{value:.4g}"})
            for callback in callbacks:
                callback(epoch, metrics)
            if waited >= config.patience:
                history.stopped_early = True
                break
    except StopTraining:
        history.stopped_early = True
    finally:
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    history.seconds = time.perf_counter() - started
    return history

"""The one training loop of every gradient-trained model: epochs over mini-batches, validation, early
stopping, LR schedule on plateau, gradient clipping, a NaN guard, a progress bar and per-epoch callbacks.

A module takes part by implementing `configure_optimizers`, `training_step(batch, ctx)` and
`validation_step(batch, ctx)`. `training_step` calls `ctx.optimize(loss, i)` once per parameter update
(a WGAN calls it for the critic and the generator; a DBM with its contrastive surrogate loss), so clipping,
the NaN guard and stepping live here, written once.

`Adam` and the plateau rule are written here rather than taken from torch.optim: torch.optim's optimizers import
torch._dynamo the first time one is built or stepped (their methods are wrapped to keep the compiler out), which
stalls the first step by seconds; these call the same fused kernel and apply the same rule without it.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from scdgm.errors import ScdgmError
from scdgm.models.base import EpochCallback, TrainingHistory
from scdgm.models.data import Batch, CountBatches
from scdgm.models.nn import step_threads


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


class Optimizer(Protocol):
    """What the loop needs of an optimizer: `Adam` below, or any torch.optim optimizer."""

    param_groups: list[dict[str, Any]]

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> object: ...


class Adam:
    """Adam with L2 weight decay, the update of torch.optim.Adam(fused=True): all tensors in one fused kernel call.

    State per parameter (first and second moments, step count) starts at zero; a parameter without a gradient
    is skipped, as torch.optim does. Only the learning rate is read from `param_groups` (the plateau rule sets it).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got no parameters")
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (or zero them in place)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One Adam update of every parameter that has a gradient, the gradients first divided by `grad_scale`
        (a scalar tensor, e.g. to clip their norm) if given, and left so."""
        used = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not used:
            return
        steps = [self.steps[i] for i in used]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            [self.params[i] for i in used],
            [self.params[i].grad for i in used],
            [self.exp_avg[i] for i in used],
            [self.exp_avg_sq[i] for i in used],
            [],
            steps,
            amsgrad=False,
            lr=self.param_groups[0]["lr"],
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
            grad_scale=grad_scale,
        )


class Plateau:
    """The learning rate times `factor` once the metric has not improved on its best by more than `threshold`
    (relative) for more than `patience` steps: torch's ReduceLROnPlateau in mode 'min', without cooldown."""

    def __init__(self, optimizer: Optimizer, factor: float, patience: int, threshold: float = 1e-4) -> None:
        self.optimizer, self.factor, self.patience, self.threshold = optimizer, factor, patience, threshold
        self.best = math.inf
        self.bad_steps = 0

    def step(self, value: float) -> None:
        """Record the epoch's metric and lower the learning rate if it has stalled."""
        if value < self.best * (1.0 - self.threshold):
            self.best, self.bad_steps = value, 0
        else:
            self.bad_steps += 1
        if self.bad_steps > self.patience:
            for group in self.optimizer.param_groups:
                lowered = group["lr"] * self.factor
                if group["lr"] - lowered > 1e-8:
                    group["lr"] = lowered
            self.bad_steps = 0


class Replicas(Protocol):
    """The group of copies of one module in data-parallel training, each on its own shard of the cells
    (`pipelines.distributed` on Ray): every copy steps with the gradient averaged over all of them and sees
    epoch totals over all cells, so all copies stay equal and stop, keep and lower the LR on the same epoch."""

    def average(self, grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Replace `grads` in place by their mean over the copies; returns the mean `loss`."""

    def sum(self, totals: torch.Tensor, cells: int) -> tuple[torch.Tensor, int]:
        """Per-term totals and the cell count summed over the copies."""


class StepContext:
    """What a module's step sees: the epoch, training progress in [0, 1], and `optimize` for updates."""

    def __init__(
        self, optimizers: Sequence[Optimizer], config: LoopConfig, max_epochs: int, replicas: Replicas | None = None
    ) -> None:
        self.optimizers = list(optimizers)
        self.config = config
        self.replicas = replicas
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
        """Backpropagate `loss`, clip gradients, check both for NaN/inf (one host sync) and step optimizer
        `optimizer_index`."""
        optimizer = self.optimizers[optimizer_index]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        checked = loss.detach()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.replicas is not None:  # data-parallel: clip, check and step the mean over every copy, as one
            checked = self.replicas.average([p.grad for p in params], checked)
        norm = None
        if self.config.grad_clip is not None and params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            checked = checked + norm
        if not torch.isfinite(checked):
            raise TrainingDiverged(
                f"loss {loss.item()} or gradient norm became non-finite at epoch {self.epoch + 1}; lower the "
                "learning rate or check the input"
            )
        if norm is None:
            optimizer.step()
        elif isinstance(optimizer, Adam):  # clipped inside its fused update: one pass less over the gradients
            optimizer.step(grad_scale=((norm + 1e-6) / self.config.grad_clip).clamp_(min=1.0))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.grad_clip, norm, foreach=True)
            optimizer.step()


class TrainableModule(Protocol):
    """The torch module side of a model, as the loop drives it."""

    def configure_optimizers(self) -> list[Optimizer]: ...

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]: ...

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]: ...

    def train(self, mode: bool = True) -> torch.nn.Module: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> object: ...


def _mean_metrics(totals: dict[str, float], count: int, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v / max(count, 1) for k, v in totals.items()}


def _run_epoch(module: TrainableModule, batches: CountBatches, ctx: StepContext, training: bool) -> dict[str, float]:
    """Average each reported term over cells (steps report per-cell means; weights are batch sizes)."""
    keys: list[str] = []
    total: torch.Tensor | None = None
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
        # every term summed in one float64 tensor: no host sync per step (matters on a GPU), one op per step
        values = torch.stack([torch.as_tensor(value, dtype=torch.float64) for value in logs.values()]).detach()
        total = values * size if total is None else total.add_(values, alpha=size)
        keys = list(logs)
        cells += size
    if ctx.replicas is not None and total is not None:  # data-parallel: the epoch's terms over every copy's cells
        total, cells = ctx.replicas.sum(total, cells)
    sums = dict(zip(keys, total.tolist(), strict=True)) if total is not None else {}
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
    replicas: Replicas | None = None,
) -> TrainingHistory:
    """Train `module` in place and leave it at its best epoch on the monitored metric; returns the history.

    Without validation cells, the monitored metric falls back to the training loss of the same name. With
    `replicas` this is one copy of data-parallel training: its batches are its shard of the cells.
    """
    ctx = StepContext(module.configure_optimizers(), config, config.max_epochs, replicas)
    history = TrainingHistory()
    started = time.perf_counter()
    with step_threads(train_batches.batch_size * train_batches.n_genes, train_batches.device):
        best_state = _train_epochs(module, train_batches, validation_batches, ctx, callbacks, history)
    if best_state is not None:
        module.load_state_dict(best_state)
    history.seconds = time.perf_counter() - started
    return history


def _train_epochs(
    module: TrainableModule,
    train_batches: CountBatches,
    validation_batches: CountBatches | None,
    ctx: StepContext,
    callbacks: Sequence[EpochCallback],
    history: TrainingHistory,
) -> dict[str, torch.Tensor] | None:
    """The epochs of `fit_module`, recorded in `history`, until the budget, patience or a callback's
    StopTraining ends them; returns the best epoch's state (None when no epoch after warm-up was one)."""
    config = ctx.config
    optimizers = ctx.optimizers
    schedulers = [Plateau(opt, factor=config.lr_factor, patience=config.lr_patience) for opt in optimizers]
    best_value, best_state, waited = math.inf, None, 0
    monitor = config.monitor if validation_batches is not None else config.monitor.replace("validation_", "train_")
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
    return best_state

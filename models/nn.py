"""Building blocks shared by the torch modules: fully connected stacks, a batch one-hot helper, and the thread
plan of a training step on CPU (`step_threads`, with `Linear`)."""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

ENTRIES_PER_THREAD = 1 << 19
"""Entries of a step's elementwise operations below which `step_threads` runs them on one thread: a (128 cells x
2,000 genes) batch has 2**18."""
MIN_WEIGHTS_PER_SPLIT = 1 << 16
"""Weights of a `Linear` (in x out) below which `step_threads` leaves its products whole: splitting a smaller one
costs more in hand-over than the helper threads save (a 2,000-gene input layer of 128 units has 2**18)."""
MIN_ROWS_PER_PRODUCT = 32
"""Fewest rows of a product's output that one thread of `step_threads` computes."""
_helpers: ThreadPoolExecutor | None = None
"""Inside `step_threads`: the threads that compute parts of `Linear`'s products next to the step's own."""
_threads = 1
"""Threads that share a product: torch's thread count inside `step_threads`, else 1."""


@contextmanager
def step_threads(entries: int, device: torch.device) -> Iterator[None]:
    """Run training steps whose elementwise operations span `entries` on one thread, and `Linear`'s products on
    all of torch's threads, each thread a slice of the product. On CPU torch hands part of every operation over
    32k entries to its other threads; when idle threads sleep (OMP_WAIT_POLICY=PASSIVE, as the CLI sets, so that
    shared cores are not burnt) waking them costs more than the split saves on small tensors, and MKL's own
    threads gained nothing on products of this size. Measured on 2 cores, VAE step on PBMC 3k: 7.9k cells/s on two
    threads, 10.5k on one, and more with the products split over both (bench/train_throughput.py). With spinning
    threads (the OpenMP default), one thread, a GPU or large batches this changes nothing."""
    global _helpers, _threads
    threads = torch.get_num_threads()
    if (device.type != "cpu" or threads < 2 or entries >= ENTRIES_PER_THREAD
            or os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"):
        yield
        return
    _helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix="scdgm-products", initializer=torch.set_num_threads,
                                  initargs=(1,))
    _threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _helpers.shutdown()
        _helpers, _threads = None, 1


def _together(tasks: Sequence[Callable[[], object]]) -> None:
    """Run `tasks` at once: the first on this thread, the others on the helper threads (one after the other
    outside `step_threads`)."""
    if _helpers is None:
        for task in tasks:
            task()
        return
    pending = [_helpers.submit(torch.no_grad()(task)) for task in tasks[1:]]  # grad mode is per thread
    tasks[0]()
    for task in pending:
        task.result()


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ bias), its row blocks computed at once on this and the helper threads."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    parts = max(1, min(_threads, a.shape[0] // MIN_ROWS_PER_PRODUCT))
    bounds = [a.shape[0] * i // parts for i in range(parts + 1)]

    def block(start: int, stop: int) -> None:
        if bias is None:
            torch.mm(a[start:stop], b, out=out[start:stop])
        else:
            torch.addmm(bias, a[start:stop], b, out=out[start:stop])

    _together([partial(block, start, stop) for start, stop in itertools.pairwise(bounds)])
    return out


class _Linear(torch.autograd.Function):
    """x W^T + b and its gradients, the products spread over the threads of `step_threads`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight.t(), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = grad_weight = None
        if torch.is_grad_enabled():  # create_graph (e.g. a gradient penalty): products autograd can differentiate
            grad_x = grad @ weight if need_x else None
            grad_weight = grad.t() @ x if need_weight else None
        elif need_x and need_weight:  # the two products side by side
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            _together([partial(torch.mm, grad, weight, out=grad_x), partial(torch.mm, grad.t(), x, out=grad_weight)])
        elif need_x:
            grad_x = _product(grad, weight)
        elif need_weight:
            grad_weight = _product(grad.t(), x)
        grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (same parameters and state) whose large products use every thread inside `step_threads`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _helpers is None or x.dim() != 2 or self.in_features * self.out_features < MIN_WEIGHTS_PER_SPLIT:
            return super().forward(x)
        return _Linear.apply(x, self.weight, self.bias)


def mlp(
    n_in: int,
    hidden: Sequence[int],
    n_out: int | None = None,
    dropout: float = 0.0,
    batch_norm: bool = False,
    layer_norm: bool = False,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear → [norm] → activation → [dropout] for each hidden width, then an optional linear output."""
    layers: list[nn.Module] = []
    width = n_in
    for size in hidden:
        layers.append(Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size, momentum=0.01, eps=1e-3))
        if layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(activation())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if n_out is not None:
        layers.append(Linear(width, n_out))
    return nn.Sequential(*layers)


def with_batch(x: torch.Tensor, batch_index: torch.Tensor | None, n_batches: int) -> torch.Tensor:
    """Append the one-hot batch covariate to `x` (unchanged when the model has no batch covariate)."""
    if n_batches == 0 or batch_index is None:
        return x
    return torch.cat([x, nn.functional.one_hot(batch_index, n_batches).to(x.dtype)], dim=-1)

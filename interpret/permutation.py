"""Max-statistic permutation test, run in batches on threads or on an already running Ray cluster.

The statistic maps a batch of row permutations (b × n) to b null values (for the log-linear step: the largest
G² over all candidates and latents). Permutation k is drawn from its own child of the seed, so the p-value does
not depend on the batch size, the number of workers or the backend.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from scdgm.errors import ScdgmError

Backend = Literal["threads", "ray"]
Statistic = Callable[[np.ndarray], np.ndarray]
TIES = 1e-9
"""Null values within this relative distance of the observed one count as ties (≥), against rounding."""


@dataclass
class PermutationResult:
    """p = (1 + #null ≥ observed) / (B + 1); when stopped early it is a lower bound, already above alpha."""

    observed: float
    pvalue: float
    null: np.ndarray
    permutations: int
    stopped_early: bool


def permutation_test(
    statistic: Statistic,
    observed: float,
    n: int,
    permutations: int,
    batch_size: int = 64,
    alpha: float | None = None,
    seed: int | np.random.SeedSequence = 0,
    n_jobs: int = 1,
    backend: Backend = "threads",
) -> PermutationResult:
    """Compare `observed` with the statistic under `permutations` random row permutations of n samples.

    With alpha, stops as soon as the p-value is sure to exceed alpha. backend="ray" needs `ray.init` done.
    """
    if permutations < 1:
        raise ScdgmError(f"permutations must be >= 1, got {permutations}")
    if n_jobs < 1:
        raise ScdgmError(f"n_jobs must be >= 1, got {n_jobs}")
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    # the children SeedSequence.spawn would give, without advancing `sequence`: the same seed, the same test
    children = [np.random.SeedSequence(sequence.entropy, spawn_key=(*sequence.spawn_key, k))
                for k in range(permutations)]
    size = max(1, batch_size)
    batches = [children[i:i + size] for i in range(0, permutations, size)]
    threshold = observed - TIES * max(1.0, abs(observed))
    null: list[np.ndarray] = []
    exceed = 0
    stopped = False
    with closing(_run(statistic, n, batches, n_jobs, backend)) as results:
        for values in results:
            null.append(values)
            exceed += int((values >= threshold).sum())
            if alpha is not None and (1 + exceed) / (permutations + 1) > alpha:
                stopped = sum(v.size for v in null) < permutations
                break
    return PermutationResult(observed, (1 + exceed) / (permutations + 1), np.concatenate(null), permutations,
                             stopped)


def run_batch(statistic: Statistic, n: int, seeds: list[np.random.SeedSequence]) -> np.ndarray:
    """The statistic for the permutations drawn from each seed (one per row)."""
    return np.asarray(statistic(np.stack([np.random.default_rng(s).permutation(n) for s in seeds])))


def _run(statistic: Statistic, n: int, batches: list[list[np.random.SeedSequence]], n_jobs: int,
         backend: Backend) -> Iterator[np.ndarray]:
    """Yield each batch's null values in order; at most 2·n_jobs batches are in flight."""
    if backend == "ray":
        yield from _on_ray(statistic, n, batches, n_jobs)
    elif backend != "threads":
        raise ScdgmError(f"backend must be 'threads' or 'ray', got {backend!r}")
    elif n_jobs == 1:
        yield from (run_batch(statistic, n, seeds) for seeds in batches)
    else:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            futures = _windowed(lambda seeds: pool.submit(run_batch, statistic, n, seeds), batches, 2 * n_jobs)
            try:
                yield from (future.result() for future in futures)
            finally:
                pool.shutdown(cancel_futures=True)


def _on_ray(statistic: Statistic, n: int, batches: list[list[np.random.SeedSequence]],
            n_jobs: int) -> Iterator[np.ndarray]:
    """Run batches as Ray tasks on the cluster this process is already connected to."""
    import ray

    if not ray.is_initialized():
        raise ScdgmError("backend='ray' needs a running Ray: call ray.init(...) first (none is started here)")
    task = ray.remote(run_batch)
    shared = ray.put(statistic)
    window = max(2 * n_jobs, int(ray.available_resources().get("CPU", 1)))
    pending: deque[Any] = deque()
    try:
        for ref in _windowed(lambda seeds: task.remote(shared, n, seeds), batches, window, pending):
            yield ray.get(ref)
    finally:
        for ref in pending:
            ray.cancel(ref)


def _windowed(submit: Callable[[Any], Any], items: Iterable[Any], window: int,
              pending: deque[Any] | None = None) -> Iterator[Any]:
    """Submit items keeping `window` in flight, and yield their handles in submission order."""
    pending = deque() if pending is None else pending
    source = iter(items)
    for item in source:
        pending.append(submit(item))
        if len(pending) >= window:
            break
    while pending:
        handle = pending.popleft()
        following = next(source, None)
        if following is not None:
            pending.append(submit(following))
        yield handle

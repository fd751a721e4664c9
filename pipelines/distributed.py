"""Data-parallel training of one model on Ray (`scdgm train --workers N`): Ray Train's TorchTrainer starts N
workers on the cluster's nodes with a torch.distributed process group (gloo on CPUs, NCCL on GPUs); each trains
a copy of the model on its shard of the training cells through the one training loop, which averages the
gradients over the copies at every update and sums each epoch's totals over them (DDP's rule, applied at the
loop's `optimize`, so a WGAN's two updates per step are averaged alike). All copies stay equal and stop on the
same epoch.

The driver builds and initialises the module from all training cells (as single-process training does), sends
it with each worker's shard through Ray's object store (no shared file system needed; counts streamed from an
.h5ad travel as the file's path and the shard's rows, and each worker reads its own cells from the file, which
must then be at the same path on every node), and gets rank 0's best
weights, history and the workers' nodes back as its return value; it saves the model itself. `batch_size` stays
the size of one update over all workers (each takes `batch_size / N` cells), so a configuration means the same
with any number of workers.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig, TrainingFailedError, WorkerGroupError
from ray.train.torch import TorchTrainer
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from scdgm.errors import InputError, ScdgmError
from scdgm.models import MODEL_KINDS, model_class
from scdgm.models.base import EpochCallback, TrainingHistory
from scdgm.models.data import CountBatches, Counts, StreamBatches, make_batches, subset_counts
from scdgm.models.torch_model import TorchModel
from scdgm.models.training import seed_everything
from scdgm.pipelines.cluster import check_reachable, remove_folder

PARALLEL_KINDS = tuple(kind for kind in MODEL_KINDS if issubclass(model_class(kind), TorchModel))
"""The model kinds that train by gradient steps, hence data-parallel (PCA is fitted in closed form)."""


def check_parallel_kind(kind: str) -> None:
    """Refuse data-parallel training of a model that is not trained by gradient steps."""
    if kind not in PARALLEL_KINDS:
        raise InputError(f"--workers trains gradient-trained models ({', '.join(PARALLEL_KINDS)}); {kind} is fitted "
                         "in closed form on one machine")


def data_parallel(kind: str, workers: int, address: str | None, gpus_per_worker: int) -> RayDataParallel:
    """The data-parallel training `scdgm train --workers` asks for, checked before Ray starts: a gradient-trained
    model, an `address` that answers, and GPUs only where this machine has one when it starts its own Ray."""
    check_parallel_kind(kind)
    if address is not None:
        check_reachable(address)
    if gpus_per_worker and address is None and not torch.cuda.is_available():
        raise ScdgmError(f"--gpus-per-worker {gpus_per_worker}: this machine has no CUDA GPU; pass --address of "
                         "a Ray cluster with GPUs, or leave the option out to train on CPUs")
    return RayDataParallel(workers, gpus_per_worker)


def shard_cells(train: np.ndarray, validation: np.ndarray, workers: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training rows, validation rows) of each worker. The training cells in a seeded random order are dealt
    out in turn, padded by wrapping round so that every shard is equally large and all workers take the same
    number of steps; the validation cells are dealt out too, or each worker gets all of them when they are
    fewer than the workers (epoch totals are summed, so validation metrics are the mean over cells either way)."""
    order = np.random.default_rng(seed).permutation(np.flatnonzero(train))
    padded = np.resize(order, -(-len(order) // workers) * workers)
    held = np.flatnonzero(validation)
    return [
        (np.sort(padded[rank::workers]), np.sort(held[rank::workers]) if len(held) >= workers else held)
        for rank in range(workers)
    ]


def worker_seed(seed: int, rank: int) -> int:
    """The seed of worker `rank`: its own stream of shuffles and noise, fixed by the model's seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclass
class Shard:
    """One worker's cells: training and validation counts (model gene order; in memory or streamed) and their
    batch codes."""

    train: Counts
    train_codes: np.ndarray | None
    validation: Counts
    validation_codes: np.ndarray | None


class TorchReplicas:
    """The workers of torch.distributed's default process group as `models.training.Replicas`: one all-reduce
    per update (gradients and loss in one flat buffer) and one per epoch pass (the totals and cell count)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.size = dist.get_world_size()

    def average(self, grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Replace `grads` in place by their mean over the workers; returns the mean loss."""
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float()])
        dist.all_reduce(flat)
        flat.div_(self.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]

    def sum(self, totals: torch.Tensor, cells: int) -> tuple[torch.Tensor, int]:
        """The per-term totals and the cell count summed over the workers."""
        count = torch.tensor([cells], dtype=totals.dtype)
        buffer = torch.cat([totals.cpu(), count]).to(self.device)
        dist.all_reduce(buffer)
        buffer = buffer.cpu()
        return buffer[:-1].to(totals.device), int(buffer[-1].item())


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: its copy of the model on its device, its shard of the cells in batches of
    `batch_size`, the training loop with the other workers as replicas. Rank 0 returns the best weights
    (safetensors bytes: Ray refuses tensors in return values), the history and every worker's node id."""
    rank = ray.train.get_context().get_world_rank()
    model: TorchModel = ray.get(config["model"])
    shard: Shard = ray.get(config["shards"][rank])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed = worker_seed(model.config.seed, rank)
    seed_everything(seed)
    model.module.to(device)

    def batches(counts: Counts, codes: np.ndarray | None, shuffle: bool) -> CountBatches | StreamBatches:
        return make_batches(counts, batch_codes=codes, batch_size=config["batch_size"], shuffle=shuffle, seed=seed,
                            device=device, drop_last=shuffle)

    validation = batches(shard.validation, shard.validation_codes, False) if shard.validation.shape[0] else None
    history = model.train_module(batches(shard.train, shard.train_codes, True), validation, (), TorchReplicas(device))
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank:
        return None
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.module.state_dict().items()}
    return {"weights": save_tensors(weights), "history": history, "nodes": nodes}


class RayDataParallel:
    """`models.torch_model.DataParallel` on the Ray cluster this process has joined: `workers` Ray Train
    workers with one CPU each, and with `gpus_per_worker` 1 a GPU each (NCCL needs one per worker, and a worker
    trains on one). `nodes` then holds the node id of each worker, by rank."""

    def __init__(self, workers: int, gpus_per_worker: int = 0) -> None:
        if workers < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        if gpus_per_worker not in (0, 1):
            raise InputError(f"--gpus-per-worker must be 0 (CPUs) or 1 (a GPU per worker), got {gpus_per_worker}")
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.nodes: list[str] = []

    def check_resources(self) -> None:
        """Refuse a worker group the Ray cluster could never place (Ray would wait for it forever)."""
        available = ray.cluster_resources()
        cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
        if self.workers > cpus:
            raise ScdgmError(f"--workers {self.workers}: each worker needs a CPU but the Ray cluster has {cpus:g}; "
                             "use fewer workers or add nodes")
        if self.workers * self.gpus_per_worker > gpus:
            raise ScdgmError(f"--gpus-per-worker {self.gpus_per_worker}: {self.workers} worker(s) need "
                             f"{self.workers * self.gpus_per_worker} GPU(s) but the Ray cluster has {gpus:g}")

    def fit(
        self,
        model: TorchModel,
        counts: Counts,
        codes: np.ndarray | None,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Train `model.module` on the workers, load rank 0's best weights into it and return the history; the
        callbacks then see each epoch's metrics in turn (the workers do not call back while they train)."""
        self.check_resources()
        refs = [
            ray.put(Shard(subset_counts(counts, t), None if codes is None else codes[t], subset_counts(counts, v),
                          None if codes is None else codes[v]))
            for t, v in shard_cells(train, validation, self.workers, model.config.seed)
        ]
        replica = copy.copy(model)
        replica.module = copy.deepcopy(model.module).cpu()
        replica.config = dataclasses.replace(model.config, progress=False)
        replica.data_parallel = None
        storage = tempfile.mkdtemp(prefix="scdgm-train-", dir="/tmp")  # Ray Train's run folder; nothing is kept
        try:
            outcome = _run(TorchTrainer(
                train_worker,
                train_loop_config={
                    "model": ray.put(replica),
                    "shards": refs,
                    "batch_size": max(1, model.config.batch_size // self.workers),
                },
                scaling_config=ScalingConfig(
                    num_workers=self.workers,
                    use_gpu=self.gpus_per_worker > 0,
                    resources_per_worker={"CPU": 1, "GPU": self.gpus_per_worker} if self.gpus_per_worker else {"CPU": 1},
                ),
                run_config=RunConfig(name=f"scdgm-{model.kind}", storage_path=storage),
            ))
        finally:
            remove_folder(storage)
        model.module.load_state_dict(load_tensors(outcome["weights"]))
        self.nodes = list(outcome["nodes"])
        history: TrainingHistory = outcome["history"]
        for epoch, metrics in enumerate(history.epochs):
            for callback in callbacks:
                callback(epoch, metrics)
        return history


def _run(trainer: TorchTrainer) -> dict[str, Any]:
    """Rank 0's return value of the trainer's run, which goes on in a thread of its own: Ray swallows what a
    signal handler raises while the main thread waits in `ray.get`, so the main thread waits on the thread,
    where Ctrl+C and SIGTERM raise the CLI's Terminated as anywhere; leaving Ray then ends the workers. A
    worker's ScdgmError (e.g. TrainingDiverged) is raised as itself."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
            outcome["error"] = error

    runner = threading.Thread(target=fit, name="scdgm-ray-train", daemon=True)
    runner.start()
    runner.join()
    error = outcome.get("error")
    if isinstance(error, WorkerGroupError):
        failures = [failure for _, failure in sorted(error.worker_failures.items())]
        user = [failure for failure in failures if isinstance(failure, ScdgmError)]
        raise (user or failures)[0] if failures else error
    if isinstance(error, TrainingFailedError):
        raise ScdgmError(f"data-parallel training failed: {str(error).splitlines()[-1]}")
    if error is not None:
        raise error
    return outcome["result"].return_value

"""Shared machinery of the gradient-trained models (ae, vae, ldvae, gan, dbm): fitting through the one
training loop, batch covariates, batched embedding and sampling, and weights as the module's state dict.

A model supplies `build_module`; the module supplies the hooks of `GenerativeModule` below. Models whose
encoder reads the counts differentiably derive from `TorchCountEncoder`, which declares `CountEncoder`.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scdgm.errors import InputError
from scdgm.models.base import (
    CountEncoder,
    Embedding,
    EpochCallback,
    GenerativeModel,
    ModelConfig,
    Samples,
    Source,
    TrainingHistory,
    check_at_least,
    check_non_negative,
    check_positive,
    check_tensor_shapes,
)
from scdgm.models.data import (
    Batch,
    CountBatches,
    Counts,
    StreamBatches,
    check_device,
    make_batches,
    model_counts,
    resolve_device,
    subset_counts,
)
from scdgm.models.likelihoods import LibraryPrior
from scdgm.models.training import LoopConfig, Replicas, fit_module, seed_everything


@dataclass
class TrainConfig(ModelConfig):
    """Hyperparameters every gradient-trained model shares; each model's Config extends this."""

    seed: int = 0
    device: str = "auto"
    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 30
    grad_clip: float | None = 10.0
    batch_key: str | None = None
    progress: bool = True

    def check(self) -> None:
        """At least one epoch, positive sizes and rates: zero epochs would save an untrained model."""
        super().check()
        check_at_least(0, seed=self.seed)
        check_at_least(1, max_epochs=self.max_epochs, batch_size=self.batch_size, patience=self.patience)
        check_positive(lr=self.lr)
        check_non_negative(weight_decay=self.weight_decay)
        if self.grad_clip is not None:
            check_positive(grad_clip=self.grad_clip)
        check_device(self.device)


class GenerativeModule(Protocol):
    """Hooks a torch module offers (besides the training-loop hooks of models.training.TrainableModule)."""

    library_prior: LibraryPrior | None
    """The log-library-size model of the training cells, fitted per batch before training (None: no library)."""

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and variance of the batch's cells."""

    def draw_posterior(self, batch: Batch) -> torch.Tensor:
        """One latent draw per cell from its (approximate) posterior."""

    def draw_prior(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`n` latent draws from the prior with a log library size and batch code for each."""

    def generate(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """Synthetic expression drawn from the model's likelihood given latents and cell context."""

    def expected(self, batch: Batch) -> torch.Tensor:
        """Expected expression of each cell given its own latent mean (reconstruction)."""


class DataParallel(Protocol):
    """Runs the training loop of a built model on several workers, each on its shard of the training cells
    (`TorchModel.data_parallel`; `pipelines.distributed` supplies one on Ray)."""

    def fit(
        self,
        model: TorchModel,
        counts: Counts,
        codes: np.ndarray | None,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Train `model.module` (built and initialised from all training cells) on the cells of `train`, early
        stopping on `validation`; leaves it at its best epoch and returns the history."""


class TorchModel(GenerativeModel):
    """Base of the torch models: `fit` runs the shared loop; embed/sample/reconstruct batch over cells."""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.module: torch.nn.Module | None = None
        self.data_parallel: DataParallel | None = None
        """When set, `fit` builds the module here and the workers of `data_parallel` train it."""

    @property
    def batch_key(self) -> str | None:
        return self.config.batch_key

    @abstractmethod
    def build_module(self, n_genes: int, n_batches: int, train_counts: Counts | None) -> torch.nn.Module:
        """Create the torch module; `train_counts` (None when loading) lets it set data-derived buffers (read in
        chunks: `models.data.count_chunks`)."""

    def init_from_data(self, train_batches: CountBatches | StreamBatches) -> None:
        """Set data-derived buffers of the new module from the training batches: its library prior is fitted per
        batch (it needs the batch codes `build_module` does not see)."""
        if self.module.library_prior is not None:
            self.module.library_prior.fit(train_batches.log_library, train_batches.batch_codes)

    def warmup_epochs(self) -> int:
        """Epochs whose objective a schedule still changes (none here): the loop neither keeps nor stops on them."""
        return 0

    # --- fitting ---------------------------------------------------------------------------------------
    def fit_counts(
        self,
        counts: Counts,
        obs: pd.DataFrame,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        config = self.config
        seed_everything(config.seed)
        device = resolve_device(config.device)
        labels = self.batch_labels(obs)
        if labels is not None:
            self.batch_categories = sorted(set(labels.tolist()))
        codes = self.batch_codes(labels, counts.shape[0])
        train_counts = subset_counts(counts, train)
        self.module = self.build_module(len(self.genes), len(self.batch_categories), train_counts).to(device)
        train_batches = self._batches(train_counts, codes, train, shuffle=True)
        self.init_from_data(train_batches)
        if self.data_parallel is not None:
            self.history = self.data_parallel.fit(self, counts, codes, train, validation, callbacks)
        else:
            validation_batches = (
                self._batches(subset_counts(counts, validation), codes, validation) if validation.any() else None
            )
            self.history = self.train_module(train_batches, validation_batches, callbacks)
        self.module.eval()
        return self.history

    def train_module(
        self,
        train_batches: CountBatches | StreamBatches,
        validation_batches: CountBatches | StreamBatches | None,
        callbacks: Sequence[EpochCallback] = (),
        replicas: Replicas | None = None,
    ) -> TrainingHistory:
        """Run the one training loop on the built module, which it leaves at its best epoch; in data-parallel
        training the batches are this worker's shard and `replicas` the group of workers."""
        config = self.config
        loop = LoopConfig(
            max_epochs=config.max_epochs,
            min_epochs=self.warmup_epochs(),
            patience=config.patience,
            grad_clip=config.grad_clip,
            progress=config.progress,
            description=f"training {self.kind}",
        )
        return fit_module(self.module, train_batches, validation_batches, loop, callbacks, replicas)

    def _batches(
        self, counts: Counts, codes: np.ndarray | None, mask: np.ndarray | None = None, shuffle: bool = False
    ) -> CountBatches | StreamBatches:
        return make_batches(
            counts,
            batch_codes=None if codes is None else (codes[mask] if mask is not None else codes),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            seed=self.config.seed,
            device=self.device,
            drop_last=shuffle,
            whole=True,  # fit's counts are checked to be whole numbers (models.data.training_counts)
        )

    # --- inference -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.module is not None:
            return next(self.module.parameters()).device
        return resolve_device(self.config.device)

    def _require_module(self) -> torch.nn.Module:
        if self.module is None:
            raise InputError(f"{self.kind}: the model has not been fitted or loaded")
        return self.module

    def count_batches(
        self, counts: Counts, batch: Sequence[str] | np.ndarray | None = None, batch_size: int = 4096
    ) -> CountBatches | StreamBatches:
        """Inference batches of cells given as counts in the model's gene order (and their batch labels)."""
        self._require_module()
        codes = self.batch_codes(batch, counts.shape[0])
        return make_batches(counts, batch_codes=codes, batch_size=batch_size, device=self.device)

    def inference_batches(self, adata: ad.AnnData, batch_size: int = 4096) -> CountBatches:
        """Batches of `adata`'s cells in the model's gene order, for inference."""
        return self.count_batches(model_counts(adata, self.genes), self.batch_labels(adata.obs), batch_size)

    def _map(self, batches: CountBatches | StreamBatches, fn: Any) -> list[Any]:
        module = self._require_module()
        module.eval()
        with torch.no_grad():
            return [fn(module, batch) for batch in batches]

    def embed_counts(self, counts: Counts, batch: Sequence[str] | np.ndarray | None = None) -> Embedding:
        parts = self._map(self.count_batches(counts, batch), lambda m, b: m.encode(b))
        mean = torch.cat([p[0] for p in parts]).cpu().numpy()
        var = torch.cat([p[1] for p in parts]).cpu().numpy()
        return Embedding(mean=mean, var=var)

    def reconstruct(self, adata: ad.AnnData) -> np.ndarray:
        return torch.cat(self._map(self.inference_batches(adata), lambda m, b: m.expected(b))).cpu().numpy()

    def sample_chunks(
        self,
        counts: Counts,
        batch: Sequence[str] | np.ndarray | None = None,
        draws: int = 1,
        seed: int | None = None,
    ) -> Iterator[Samples]:
        """Posterior draws for cells given as counts in the model's gene order, a batch of cells at a time
        (draw-major, `cell_index` = position in `counts`): `sample` concatenates them; data larger than memory
        are written as they come. Seeded once; the caller must not draw torch random numbers between chunks."""
        module = self._require_module()
        module.eval()
        seed = self.config.seed if seed is None else seed
        batches = self.count_batches(counts, batch)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in range(draws):
                for cells in batches:
                    z = module.draw_posterior(cells)
                    x = module.generate(z, cells.log_library, cells.batch_index)
                    yield Samples(x=x.cpu().numpy(), z=z.cpu().numpy(), source="posterior",
                                  cell_index=cells.index.numpy())

    def sample(
        self,
        adata: ad.AnnData | None = None,
        n: int | None = None,
        source: Source = "posterior",
        draws: int = 1,
        seed: int | None = None,
    ) -> Samples:
        if source == "posterior":
            if adata is None:
                raise InputError("posterior sampling needs cells (adata)")
            counts = model_counts(adata, self.genes)
            parts = list(self.sample_chunks(counts, self.batch_labels(adata.obs), draws, seed))
            return Samples(x=np.concatenate([p.x for p in parts]), z=np.concatenate([p.z for p in parts]),
                           source="posterior", cell_index=np.concatenate([p.cell_index for p in parts]))
        if source != "prior":
            raise InputError(f"source must be 'posterior' or 'prior', got {source!r}")
        if not n or n < 1:
            raise InputError("prior sampling needs a positive number of cells (n)")
        module = self._require_module()
        module.eval()
        seed = self.config.seed if seed is None else seed
        devices = [self.device] if self.device.type == "cuda" else []
        xs, zs = [], []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, n, 4096):
                z, log_library, batch_index = module.draw_prior(min(4096, n - start))
                xs.append(module.generate(z, log_library, batch_index))
                zs.append(z)
        return Samples(x=torch.cat(xs).cpu().numpy(), z=torch.cat(zs).cpu().numpy(), source="prior")

    # --- persistence -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._require_module().state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        module = self.build_module(len(self.genes), len(self.batch_categories), None)
        check_tensor_shapes({name: value.shape for name, value in module.state_dict().items()}, tensors)
        module.load_state_dict(tensors)
        self.module = module.to(resolve_device(self.config.device)).eval()


class TorchCountEncoder(TorchModel, CountEncoder):
    """A torch model whose encoder reads the counts themselves (not a binarised form): its latent mean is
    differentiable in the counts, with the log library size recomputed from them."""

    def encode_counts(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        module = self._require_module()
        log_library = torch.log(x.sum(dim=1).clamp_min(1.0))
        index = torch.arange(x.shape[0], device=x.device)
        return module.encode(Batch(x=x, log_library=log_library, batch_index=batch_index, index=index))[0]

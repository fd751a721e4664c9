"""Shared machinery of the gradient-trained models (ae, vae, ldvae, gan, dbm): fitting through the one
training loop, batch covariates, batched embedding and sampling, and weights as the module's state dict.

A model supplies `build_module`; the module supplies the hooks of `GenerativeModule` below.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scdgm.models.base import EpochCallback, Embedding, GenerativeModel, Samples, Source, TrainingHistory, coerce_field_types
from scdgm.models.data import Batch, CountBatches, count_matrix, model_counts, resolve_device, split_mask
from scdgm.models.training import LoopConfig, fit_module, seed_everything
from scdgm.errors import InputError


@dataclass
class TrainConfig:
    """Hyperparameters every gradient-trained model shares; each model's Config extends this."""

    seed: int = 0
    device: str = "auto"
    max_epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    grad_clip: float | None = 10.0
    batch_key: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        coerce_field_types(self)


class GenerativeModule(Protocol):
    """Hooks a torch module offers (besides the training-loop hooks of models.training.TrainableModule)."""

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


class TorchModel(GenerativeModel):
    """Base of the torch models: `fit` runs the shared loop; embed/sample/reconstruct batch over cells."""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.module: torch.nn.Module | None = None
        self.batch_categories: list[str] = []

    @abstractmethod
    def build_module(self, n_genes: int, n_batches: int, train_counts: sp.csr_matrix | None) -> torch.nn.Module:
        """Create the torch module; `train_counts` (None when loading) lets it set data-derived buffers."""

    def init_from_data(self, train_batches: CountBatches) -> None:
        """Set data-derived buffers of the new module from the training batches: a module with a
        `library_prior` gets it fitted per batch (it needs the batch codes `build_module` does not see)."""
        prior = getattr(self.module, "library_prior", None)
        if prior is not None:
            prior.fit(train_batches.log_library, train_batches.batch_codes)

    # --- fitting ---------------------------------------------------------------------------------------
    def fit(self, adata: ad.AnnData, callbacks: Sequence[EpochCallback] = ()) -> TrainingHistory:
        config = self.config
        seed_everything(config.seed)
        device = resolve_device(config.device)
        self.genes = [str(g) for g in adata.var_names]
        counts = count_matrix(adata)
        codes = self._batch_codes(adata, fitting=True)
        train = split_mask(adata, "train")
        if not train.any():
            raise InputError("no training cells: obs['split'] has no 'train' entries")
        validation = split_mask(adata, "validation") if "split" in adata.obs else np.zeros(adata.n_obs, bool)
        self.module = self.build_module(len(self.genes), len(self.batch_categories), counts[train]).to(device)
        train_batches = self._batches(counts[train], codes, train, shuffle=True)
        self.init_from_data(train_batches)
        validation_batches = self._batches(counts[validation], codes, validation) if validation.any() else None
        loop = LoopConfig(
            max_epochs=config.max_epochs,
            patience=config.patience,
            grad_clip=config.grad_clip,
            progress=config.progress,
            description=f"training {self.kind}",
        )
        self.history = fit_module(self.module, train_batches, validation_batches, loop, callbacks)
        self.module.eval()
        return self.history

    def _batches(
        self, counts: sp.csr_matrix, codes: np.ndarray | None, mask: np.ndarray | None = None, shuffle: bool = False
    ) -> CountBatches:
        return CountBatches(
            counts,
            batch_codes=None if codes is None else (codes[mask] if mask is not None else codes),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            seed=self.config.seed,
            device=self.device,
            drop_last=shuffle,
        )

    def _batch_codes(self, adata: ad.AnnData, fitting: bool = False) -> np.ndarray | None:
        """Integer batch codes from obs[batch_key]; categories are fixed when fitting."""
        key = self.config.batch_key
        if key is None:
            return None
        if key not in adata.obs:
            raise InputError(f"batch_key {key!r} is not a column of obs")
        values = adata.obs[key].astype(str).to_numpy()
        if fitting:
            self.batch_categories = sorted(set(values))
        position = {c: i for i, c in enumerate(self.batch_categories)}
        unknown = sorted(set(values) - set(position))
        if unknown:
            raise InputError(f"unknown {key} value(s) {', '.join(unknown[:5])}; the model knows {self.batch_categories}")
        return np.array([position[v] for v in values], dtype=np.int64)

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

    def inference_batches(self, adata: ad.AnnData, batch_size: int = 4096) -> CountBatches:
        """Batches of `adata`'s cells in the model's gene order, for inference."""
        self._require_module()
        counts = model_counts(adata, self.genes)
        return CountBatches(
            counts, batch_codes=self._batch_codes(adata), batch_size=batch_size, device=self.device
        )

    def _map(self, adata: ad.AnnData, fn: Any) -> list[Any]:
        module = self._require_module()
        module.eval()
        with torch.no_grad():
            return [fn(module, batch) for batch in self.inference_batches(adata)]

    def embed(self, adata: ad.AnnData) -> Embedding:
        parts = self._map(adata, lambda m, b: m.encode(b))
        mean = torch.cat([p[0] for p in parts]).cpu().numpy()
        var = torch.cat([p[1] for p in parts]).cpu().numpy()
        return Embedding(mean=mean, var=var)

    def reconstruct(self, adata: ad.AnnData) -> np.ndarray:
        return torch.cat(self._map(adata, lambda m, b: m.expected(b))).cpu().numpy()

    def sample(
        self,
        adata: ad.AnnData | None = None,
        n: int | None = None,
        source: Source = "posterior",
        draws: int = 1,
        seed: int | None = None,
    ) -> Samples:
        module = self._require_module()
        module.eval()
        seed = self.config.seed if seed is None else seed
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if source == "posterior":
                if adata is None:
                    raise InputError("posterior sampling needs cells (adata)")
                xs, zs = [], []
                for _ in range(draws):
                    for batch in self.inference_batches(adata):
                        z = module.draw_posterior(batch)
                        xs.append(module.generate(z, batch.log_library, batch.batch_index))
                        zs.append(z)
                cell_index = np.tile(np.arange(adata.n_obs), draws)
            elif source == "prior":
                if not n or n < 1:
                    raise InputError("prior sampling needs a positive number of cells (n)")
                xs, zs = [], []
                for start in range(0, n, 4096):
                    z, log_library, batch_index = module.draw_prior(min(4096, n - start))
                    xs.append(module.generate(z, log_library, batch_index))
                    zs.append(z)
                cell_index = None
            else:
                raise InputError(f"source must be 'posterior' or 'prior', got {source!r}")
        x = torch.cat(xs).cpu().numpy()
        z = torch.cat(zs).cpu().numpy()
        return Samples(x=x, z=z, source=source, cell_index=cell_index)

    # --- persistence -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._require_module().state_dict())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        module = self.build_module(len(self.genes), len(self.batch_categories), None)
        module.load_state_dict(tensors)
        self.module = module.to(resolve_device(self.config.device)).eval()

    def extra_state(self) -> dict[str, Any]:
        return {"batch_categories": self.batch_categories}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.batch_categories = list(state.get("batch_categories", []))

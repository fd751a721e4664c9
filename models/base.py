"""The one interface every scdgm model implements, and the save/load format they share.

A model is created from a config dataclass, fitted on an AnnData with obs['split'], and then embeds cells
(latent mean and variance), samples synthetic cells (from the posterior of given cells or from the prior),
evaluates itself on held-out cells, and saves to a directory as JSON config + gene list + safetensors weights.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scdgm.errors import ScdgmError

Source = Literal["posterior", "prior"]
EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after every epoch with (epoch, metrics); the tuner and the tracker hook in here."""

FORMAT_VERSION = 1


@dataclass
class Embedding:
    """Latent position of each cell: mean and variance (the model's analogue where it has no variance)."""

    mean: np.ndarray
    var: np.ndarray


@dataclass
class Samples:
    """Synthetic cells: expression (counts, or 0/1 for the DBM) and the latent values that produced them.

    For posterior draws `cell_index[i]` is the row of the input AnnData that row i was drawn from; draws are
    stacked draw-major, so with one draw row i comes from cell i.
    """

    x: np.ndarray
    z: np.ndarray
    source: Source
    cell_index: np.ndarray | None = None

    def to_anndata(self, genes: Sequence[str], obs: Any = None) -> ad.AnnData:
        """Pack the draws as AnnData: .X synthetic expression, obsm['X_scdgm'] latents, obs['source_cell']."""
        adata = ad.AnnData(X=sp.csr_matrix(self.x.astype(np.float32)))
        adata.var_names = list(genes)
        adata.obsm["X_scdgm"] = self.z.astype(np.float32)
        adata.uns["scdgm_sample"] = {"source": self.source}
        if self.cell_index is not None:
            adata.obs["source_cell"] = self.cell_index.astype(np.int64)
            if obs is not None:
                for column in obs.columns:
                    adata.obs[column] = obs[column].to_numpy()[self.cell_index]
        adata.obs_names = [f"synthetic_{i}" for i in range(adata.n_obs)]
        return adata


@dataclass
class TrainingHistory:
    """Per-epoch metrics, the epoch kept (best on validation) and why training ended."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    seconds: float = 0.0


class GenerativeModel(ABC):
    """Base class of every model: config handling, gene bookkeeping and the save/load format."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    output: ClassVar[Literal["counts", "binary"]] = "counts"
    """What `sample` and `reconstruct` produce: counts, or 0/1 expression (the DBM)."""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        if isinstance(base, dict):
            base = self.Config(**base)
        try:
            self.config = dataclasses.replace(base, **overrides)
        except TypeError as exc:
            raise ScdgmError(f"{self.kind}: {exc}") from None
        self.genes: list[str] = []
        self.history = TrainingHistory()
        self.metadata: dict[str, Any] = {}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerativeModel:
        """Build from a flat mapping of hyperparameters; unknown keys are a user error naming the valid ones."""
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ScdgmError(
                f"{cls.kind}: unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return cls(cls.Config(**params))

    # --- the interface -------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, adata: ad.AnnData, callbacks: Sequence[EpochCallback] = ()) -> TrainingHistory:
        """Train on obs['split'] == 'train' with early stopping on 'validation' (all cells if no split)."""

    @abstractmethod
    def embed(self, adata: ad.AnnData) -> Embedding:
        """Latent mean and variance of each cell of `adata` (genes aligned by name)."""

    @abstractmethod
    def sample(
        self,
        adata: ad.AnnData | None = None,
        n: int | None = None,
        source: Source = "posterior",
        draws: int = 1,
        seed: int | None = None,
    ) -> Samples:
        """Synthetic cells from the posterior of `adata`'s cells (`draws` each) or `n` from the prior."""

    @abstractmethod
    def reconstruct(self, adata: ad.AnnData) -> np.ndarray:
        """Expected expression of each cell given its own latent (counts scale, or probabilities if binary)."""

    def heldout_nll(self, adata: ad.AnnData) -> dict[str, float]:
        """Mean negative log-likelihood per cell (or its bound), by name; empty where the model has none."""
        return {}

    def evaluate(self, adata: ad.AnnData, split: str | None = "test") -> dict[str, float]:
        """Held-out metrics on the cells of `split` (all cells when None or when there is no split column)."""
        from scdgm.models.evaluation import evaluate_model

        return evaluate_model(self, adata, split)

    @property
    @abstractmethod
    def n_latent(self) -> int:
        """Number of latent dimensions that `embed` returns."""

    # --- persistence -----------------------------------------------------------------------------------
    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every learned tensor, by name, for weights-only saving."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the learned tensors written by `state_tensors` (the config and genes are already set)."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable state besides tensors (e.g. batch categories); overridden where needed."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` wrote."""

    def save(self, directory: str | Path) -> Path:
        """Write config.json, genes.txt and weights.safetensors into `directory` (no pickle anywhere)."""
        if not self.genes:
            raise ScdgmError(f"{self.kind}: cannot save a model that has not been fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        save_file(tensors, str(directory / "weights.safetensors"))
        (directory / "genes.txt").write_text("\n".join(self.genes) + "\n")
        document = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "config": dataclasses.asdict(self.config),
            "extra_state": self.extra_state(),
            "history": dataclasses.asdict(self.history),
            "metadata": self.metadata,
        }
        (directory / "config.json").write_text(json.dumps(document, indent=2, default=_json_default))
        return directory

    @staticmethod
    def load(directory: str | Path) -> GenerativeModel:
        """Load any model saved by `save`; the kind recorded in config.json picks the class."""
        from scdgm.models import model_class  # local import: the registry imports every model module

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.exists():
            raise ScdgmError(f"{directory}: not a scdgm model directory (no config.json)")
        try:
            document = json.loads(config_path.read_text())
            cls = model_class(document["kind"])
            model = cls(cls.Config(**document["config"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ScdgmError(f"{config_path}: unreadable model config ({exc})") from None
        model.genes = (directory / "genes.txt").read_text().split()
        history = document.get("history") or {}
        model.history = TrainingHistory(**history) if history else TrainingHistory()
        model.metadata = document.get("metadata", {})
        model.load_extra_state(document.get("extra_state", {}))
        model.load_state_tensors(load_file(str(directory / "weights.safetensors")))
        return model


def coerce_field_types(config: Any) -> None:
    """Check every field of a config dataclass against its annotation, in place; ints and numeric text become
    floats where a float is expected (YAML reads `1e-3` as text). A wrong type is a user error naming the field.

    Call it from a config's `__post_init__` (TrainConfig does), so bad `--set` values fail before any work.
    """
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        hint = hints.get(item.name, Any)
        converted = _coerce(value, hint)
        if converted is _INVALID:
            raise ScdgmError(f"{item.name}: expected {_describe(hint)}, got {value!r}")
        object.__setattr__(config, item.name, converted)


_INVALID = object()


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            converted = _coerce(value, arg)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is Literal:
        return value if value in args else _INVALID
    if hint is type(None):
        return value if value is None else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _INVALID
        except ValueError:
            return _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    if origin in (list, tuple):
        return value if isinstance(value, (list, tuple)) else _INVALID
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

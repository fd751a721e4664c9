"""The one interface every scdgm model implements, the capabilities a model may declare, and the save/load
format they share.

A model is created from a config dataclass, fitted on the counts of an AnnData (obs['split'] train/validation,
or a seeded split it announces), and then embeds cells (latent mean and variance), samples synthetic cells (from
the posterior of given cells or from the prior), evaluates itself on held-out cells, and saves to a directory
as JSON config + gene list + safetensors weights. What only some models offer is declared by subclassing
`LinearDecoder` (gene loadings) or `CountEncoder` (a differentiable encoder of counts), checked with isinstance.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scdgm.errors import InputError, ScdgmError
from scdgm.files import write_text_atomic, write_with
from scdgm.formats import CONFIG_FILE, GENES_FILE, MODEL_FILES, WEIGHTS_FILE
from scdgm.models.data import Counts, StreamedCounts, counts_view, fit_split, model_counts, training_counts
from scdgm.models.evaluation import evaluate_model

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
    """Base class of every model: config handling, gene bookkeeping, fitting and embedding from AnnData, batch
    labels, and the save/load format. Subclasses implement the count-level methods (`fit_counts`,
    `embed_counts`) and the rest of the interface."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    output: ClassVar[Literal["counts", "binary"]] = "counts"
    """What `sample` and `reconstruct` produce: counts, or 0/1 expression (the DBM)."""
    _classes: ClassVar[dict[str, type[GenerativeModel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every concrete model class (one that sets `kind`) so `load` finds it by the recorded kind."""
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            GenerativeModel._classes[cls.kind] = cls

    @staticmethod
    def class_of(kind: str) -> type[GenerativeModel]:
        """The class implementing model `kind`; a user error naming the known kinds otherwise."""
        if kind not in GenerativeModel._classes:
            known = ", ".join(GenerativeModel._classes)
            raise ScdgmError(f"unknown model {kind!r}; choose one of {known}")
        return GenerativeModel._classes[kind]

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        try:
            base = config if config is not None else self.Config()
            if isinstance(base, dict):
                base = self.Config(**base)
            self.config = dataclasses.replace(base, **overrides)
        except TypeError as exc:
            raise ScdgmError(f"{self.kind}: {exc}") from None
        self.genes: list[str] = []
        self.batch_categories: list[str] = []
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

    # --- batch covariate -----------------------------------------------------------------------------
    @property
    def batch_key(self) -> str | None:
        """The obs column holding each cell's batch, when the model has a batch covariate (else None)."""
        return None

    def batch_labels(self, obs: pd.DataFrame) -> np.ndarray | None:
        """Each cell's batch label from obs[batch_key] (None without a batch covariate)."""
        key = self.batch_key
        if key is None:
            return None
        if key not in obs:
            raise InputError(f"batch_key {key!r} is not a column of obs")
        return obs[key].astype(str).to_numpy()

    def batch_codes(self, labels: Sequence[str] | np.ndarray | None, n_cells: int) -> np.ndarray | None:
        """Integer codes of per-cell batch labels, in the model's `batch_categories` (None without a batch
        covariate); missing or unknown labels are a user error."""
        key = self.batch_key
        if key is None:
            return None
        if labels is None or len(labels) != n_cells:
            raise InputError(f"this model was trained with batch_key {key!r}: give one batch label per cell")
        values = np.asarray(labels).astype(str)
        position = {c: i for i, c in enumerate(self.batch_categories)}
        unknown = sorted(set(values.tolist()) - set(position))
        if unknown:
            raise InputError(f"unknown {key} value(s) {', '.join(unknown[:5])}; the model knows {self.batch_categories}")
        return np.array([position[v] for v in values], dtype=np.int64)

    # --- the interface -------------------------------------------------------------------------------
    def fit(
        self, adata: ad.AnnData, callbacks: Sequence[EpochCallback] = (), *, layer: str | None = None
    ) -> TrainingHistory:
        """Train on the counts of `adata` (.X, or `adata.layers[layer]`), checked to be raw counts.

        Cells with obs['split'] == 'train' are trained on, early stopping watches 'validation'. Without a 'split'
        column a seeded random tenth of the cells (stratified by batch when the model has a batch key) is held
        out for validation, with a warning saying so; `adata`
        itself is never modified. `callbacks` are called after every epoch with (epoch, metrics).
        """
        counts = training_counts(adata, layer)
        self.genes = [str(g) for g in adata.var_names]
        return self._fit_split(counts, adata.obs, callbacks)

    def fit_streamed(
        self, counts: StreamedCounts, obs: pd.DataFrame, callbacks: Sequence[EpochCallback] = ()
    ) -> TrainingHistory:
        """`fit` for data larger than memory: counts streamed from disk (checked chunk by chunk to be raw counts),
        `obs` one row per cell of the source (the split and batch as in `fit`). Peak memory follows the counts'
        `chunk_cells`, not the number of cells; training batches come from shuffled blocks of cells."""
        counts.validate(obs.index, hint="fit on the raw counts")
        self.genes = list(counts.genes)
        return self._fit_split(counts, obs, callbacks)

    def _fit_split(self, counts: Counts, obs: pd.DataFrame, callbacks: Sequence[EpochCallback]) -> TrainingHistory:
        """Split the cells (obs['split'], else a seeded stratified random tenth for validation) and fit."""
        batch = None if self.batch_key is None or self.batch_key not in obs else obs[self.batch_key]
        train, validation = fit_split(obs, self.config.seed, None if batch is None else batch.astype(str).to_numpy())
        self.history = self.fit_counts(counts, obs, train, validation, callbacks)
        return self.history

    @abstractmethod
    def fit_counts(
        self,
        counts: Counts,
        obs: pd.DataFrame,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Train on checked float32 counts (columns = `self.genes`; in memory or streamed) given the train and
        validation masks."""

    def embed(self, adata: ad.AnnData, layer: str | None = None, key_added: str | None = "X_scdgm") -> Embedding:
        """Latent mean and variance of each cell of `adata` (counts of .X or `layer`, genes aligned by name).

        Also stores them as `adata.obsm[key_added]` and `adata.obsm[key_added + '_var']` (default X_scdgm and
        X_scdgm_var), where scverse tools look for embeddings; `key_added=None` writes nothing.
        """
        cells = counts_view(adata, layer)
        embedding = self.embed_counts(model_counts(cells, self.genes), self.batch_labels(cells.obs))
        if key_added is not None:
            adata.obsm[key_added] = embedding.mean
            adata.obsm[f"{key_added}_var"] = embedding.var
        return embedding

    @abstractmethod
    def embed_counts(self, counts: Counts, batch: Sequence[str] | np.ndarray | None = None) -> Embedding:
        """Latent mean and variance of cells given as counts in the model's gene order (and their batch labels
        when the model has a batch covariate)."""

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
    def sample_chunks(
        self,
        counts: Counts,
        batch: Sequence[str] | np.ndarray | None = None,
        draws: int = 1,
        seed: int | None = None,
    ) -> Iterator[Samples]:
        """Posterior draws (`draws` per cell) of cells given as counts in the model's gene order, a chunk of cells
        at a time, `cell_index` counting cells of `counts`: how draws of data larger than memory are written."""

    @abstractmethod
    def reconstruct(self, adata: ad.AnnData) -> np.ndarray:
        """Expected expression of each cell given its own latent (counts scale, or probabilities if binary)."""

    def heldout_nll(self, adata: ad.AnnData) -> dict[str, float]:
        """Mean negative log-likelihood per cell (or its bound), by name; empty where the model has none."""
        return {}

    def evaluate(self, adata: ad.AnnData, split: str | None = "test") -> dict[str, float]:
        """Held-out metrics on the cells of `split` (all cells when None or when there is no split column)."""
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
        """JSON-serialisable state besides tensors: the batch categories (extended where a model needs more)."""
        return {"batch_categories": self.batch_categories}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` wrote."""
        categories = state.get("batch_categories", [])
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise ScdgmError("extra_state.batch_categories must be a list of batch names")
        self.batch_categories = categories

    def save(self, directory: str | Path) -> Path:
        """Write config.json, genes.txt and weights.safetensors into `directory`, each file atomically (no
        pickle anywhere); other files there (an explanation, metrics) are left alone."""
        if not self.genes:
            raise ScdgmError(f"{self.kind}: cannot save a model that has not been fitted")
        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        write_with(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
        write_text_atomic(directory / GENES_FILE, "\n".join(self.genes) + "\n")
        document = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "config": dataclasses.asdict(self.config),
            "extra_state": self.extra_state(),
            "history": dataclasses.asdict(self.history),
            "metadata": self.metadata,
        }
        write_text_atomic(directory / CONFIG_FILE, json.dumps(document, indent=2, default=_json_default))
        return directory

    @staticmethod
    def load(directory: str | Path) -> GenerativeModel:
        """Load any model saved by `save`; the kind recorded in config.json picks the class.

        A damaged directory (config.json not JSON or missing keys, genes.txt short or missing, weights.safetensors
        truncated or not fitting the config and genes) is a ScdgmError naming the file and the problem.
        """
        directory = Path(directory)
        config_path, genes_path, weights_path = (directory / name for name in (CONFIG_FILE, GENES_FILE, WEIGHTS_FILE))
        if not config_path.is_file():
            raise ScdgmError(f"{directory}: not a scdgm model directory (no {CONFIG_FILE})")
        model = _model_from_config(config_path)
        model.genes = _read_genes(genes_path)
        tensors = _read_weights(weights_path)
        try:
            model.load_state_tensors(tensors)
        except TensorMismatch as exc:
            raise ScdgmError(f"{weights_path}: {exc}") from None
        return model


class TensorMismatch(ScdgmError):
    """Saved tensors that do not fit the model described by config.json and genes.txt."""


def check_tensor_shapes(expected: Mapping[str, Sequence[int]], tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise TensorMismatch naming the first tensor missing, unexpected or of another shape than `expected`."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise TensorMismatch(f"tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)} missing)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise TensorMismatch(f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for name, shape in expected.items():
        found = tuple(tensors[name].shape)
        if found != tuple(shape):
            raise TensorMismatch(
                f"tensor {name!r} has shape {list(found)} but {CONFIG_FILE} and {GENES_FILE} call for {list(shape)} "
                "(edited n_latent, sizes or gene list?)"
            )


def _model_from_config(path: Path) -> GenerativeModel:
    """An unfitted model of the kind and config recorded in config.json, with its history, metadata and extra
    state; any problem is one line naming the file."""
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScdgmError(f"{path}: not readable JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise ScdgmError(f"{path}: expected a JSON object, got {type(document).__name__}")
    for key, kind in (("kind", str), ("config", dict)):
        if not isinstance(document.get(key), kind):
            raise ScdgmError(f"{path}: missing or malformed {key!r} (expected {kind.__name__})")
    version = document.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ScdgmError(f"{path}: format_version {version!r} is not one this scdgm reads (up to {FORMAT_VERSION})")
    for key in ("history", "metadata", "extra_state"):
        if not isinstance(document.get(key) or {}, dict):
            raise ScdgmError(f"{path}: {key!r} must be a JSON object")
    try:
        cls = GenerativeModel.class_of(document["kind"])
        model = cls(cls.Config(**document["config"]))
        history = document.get("history") or {}
        model.history = TrainingHistory(**history) if history else TrainingHistory()
        model.metadata = document.get("metadata") or {}
        model.load_extra_state(document.get("extra_state") or {})
    except ScdgmError as exc:
        raise ScdgmError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ScdgmError(f"{path}: malformed model config ({exc.__class__.__name__}: {exc})") from None
    return model


def _read_genes(path: Path) -> list[str]:
    """The gene list of a model directory: one unique, non-empty name per line."""
    try:
        genes = path.read_text().splitlines()
    except FileNotFoundError:
        raise ScdgmError(f"{path}: missing (a model directory holds {', '.join(MODEL_FILES)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScdgmError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    if not genes:
        raise ScdgmError(f"{path}: empty; expected one gene name per line")
    blank = next((i for i, gene in enumerate(genes, start=1) if not gene.strip()), None)
    if blank is not None:
        raise ScdgmError(f"{path}: line {blank} is empty; expected one gene name per line")
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        duplicate = next(g for g in genes if g in seen or seen.add(g))
        raise ScdgmError(f"{path}: gene {duplicate!r} is listed more than once")
    return genes


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of weights.safetensors; unreadable files and non-finite values are one-line errors."""
    if not path.is_file():
        raise ScdgmError(f"{path}: missing (a model directory holds {', '.join(MODEL_FILES)})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ScdgmError(f"{path}: not a readable safetensors file ({reason})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ScdgmError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors


class LinearDecoder(ABC):
    """Declares a linear decoder: expression (on a log scale) is linear in the latents, so genes x factors
    loadings and each factor's share of variance explain the model (LDVAE, PCA)."""

    @abstractmethod
    def loadings(self) -> pd.DataFrame:
        """Genes x factors loadings (factor columns named like the latents: latent_0, ...)."""

    @abstractmethod
    def variance_explained(self, adata: ad.AnnData | None = None) -> pd.Series:
        """Share of variance carried by each factor; models whose figure depends on cells measure it on the
        training cells of `adata` (and raise InputError without it), the others ignore `adata`."""

    @property
    @abstractmethod
    def target_sum(self) -> float:
        """Counts per cell of the log-normalised expression, log1p(counts / library x target_sum), that the
        loadings are read against."""


class CountEncoder(ABC):
    """Declares an encoder that is a differentiable function of a cell's counts (gradient attributions apply)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device `encode_counts` computes on (inputs go there)."""

    @abstractmethod
    def encode_counts(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Latent means (cells x n_latent) of count rows `x` (model gene order, on the model's device, float32),
        differentiable with respect to `x`; `batch_index` holds the cells' batch codes (see `batch_codes`)."""


class ModelConfig:
    """Base of every model's config dataclass: on construction (and `dataclasses.replace`) the field types are
    coerced and `check` rejects values out of their domain, so the library, the CLI, `--set` and params.yaml
    refuse them alike, before any data is read."""

    def __post_init__(self) -> None:
        coerce_field_types(self)
        self.check()

    def check(self) -> None:
        """Raise ScdgmError naming the first value out of its domain; subclasses extend it, calling super()."""


def require(ok: bool, message: str) -> None:
    """Raise InputError(message) unless `ok`: a ScdgmError for the CLI, a ValueError for library callers."""
    if not ok:
        raise InputError(message)


def check_at_least(minimum: int, **values: int | None) -> None:
    """Each of `values` (by name) is at least `minimum`."""
    for name, value in values.items():
        require(value is not None and value >= minimum, f"{name} must be at least {minimum}, got {value!r}")


def check_positive(**values: float | None) -> None:
    """Each of `values` (by name) is a finite number above 0."""
    for name, value in values.items():
        require(value is not None and 0 < value < math.inf, f"{name} must be a positive number, got {value!r}")


def check_non_negative(**values: float | None) -> None:
    """Each of `values` (by name) is a finite number of at least 0."""
    for name, value in values.items():
        require(value is not None and 0 <= value < math.inf, f"{name} must be a number >= 0, got {value!r}")


def check_rate(**values: float | None) -> None:
    """Each of `values` (by name) is a rate in [0, 1), such as a dropout probability."""
    for name, value in values.items():
        require(value is not None and 0 <= value < 1, f"{name} must be in [0, 1), got {value!r}")


def coerce_field_types(config: Any) -> None:
    """Check every field of a config dataclass against its annotation, in place; ints and numeric text become
    floats where a float is expected (YAML reads `1e-3` as text), whole floats ints where an int is. A wrong type
    is a user error naming the field.

    `ModelConfig.__post_init__` calls it, so bad `--set` values fail before any work.
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
        if isinstance(value, float) and value.is_integer():
            return int(value)  # `--set max_epochs=1e3`, or MLflow's float parameters (400.0)
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

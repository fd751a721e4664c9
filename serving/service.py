"""The loaded model behind the endpoints: resolved and loaded once at start-up, then turning validated cell
batches into response bytes (torch inference mode, a fixed small thread count, orjson with numpy arrays).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch

from scdgm.errors import ScdgmError
from scdgm.formats import EXPLANATION_DIR, REFERENCE_FILE
from scdgm.interpret.explainer import Explainer
from scdgm.models.base import GenerativeModel
from scdgm.serving.inputs import CellBatch, InputLimits
from scdgm.serving.resolve import ResolvedModel, resolve_model
from scdgm.serving.settings import ServeSettings

logger = logging.getLogger("scdgm.serving")
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class NoExplanation(ScdgmError):
    """The served model has no log-linear explanation (HTTP 409)."""


@dataclass
class ModelService:
    """A model ready to embed cells, and its explainer when the model directory has one."""

    model: GenerativeModel
    explainer: Explainer | None
    resolved: ResolvedModel
    limits: InputLimits
    model_info: bytes

    def __post_init__(self) -> None:
        self.genes: list[str] = self.model.genes

    @classmethod
    def load(cls, settings: ServeSettings) -> ModelService:
        """Resolve the model URI, load the model (and explanation), and precompute the /v1/model answer."""
        torch.set_num_threads(settings.torch_threads)
        resolved = resolve_model(settings.model_uri, settings.tracking_uri, settings.cache_dir)
        if (resolved.directory / EXPLANATION_DIR / REFERENCE_FILE).is_file():
            explainer = Explainer.load(resolved.directory)
            model = explainer.model
        else:
            explainer, model = None, GenerativeModel.load(resolved.directory)
        if model.batch_key is not None:
            raise ScdgmError(
                f"{resolved.uri}: the model needs a batch covariate (batch_key={model.batch_key!r}), "
                "which the HTTP API does not take"
            )
        info = {
            "name": resolved.name,
            "version": resolved.version,
            "uri": settings.model_uri,
            "kind": model.kind,
            "n_genes": len(model.genes),
            "genes": model.genes,
            "n_latent": model.n_latent,
            "has_explanation": explainer is not None,
            "explanation_genes": explainer.reference["genes"] if explainer else [],
            "label_key": explainer.label_key if explainer else None,
        }
        limits = InputLimits(settings.max_cells, settings.max_missing_fraction, settings.allow_non_integer)
        logger.info("serving %s (%s, %d genes, %d latents)", resolved.uri, model.kind, len(model.genes), model.n_latent)
        return cls(model, explainer, resolved, limits, orjson.dumps(info))

    def embed(self, batch: CellBatch) -> bytes:
        """The /v1/embed response body: latent mean and variance per cell."""
        with torch.inference_mode():
            embedding = self.model.embed_counts(batch.counts)
        fields = self._batch_fields(batch)
        fields["latent_mean"] = np.ascontiguousarray(embedding.mean, dtype=np.float32)
        fields["latent_var"] = np.ascontiguousarray(embedding.var, dtype=np.float32)
        return orjson.dumps(fields, option=JSON_OPTIONS)

    def explain(self, batch: CellBatch) -> bytes:
        """The /v1/explain response body (the caller checks that there is an explainer)."""
        explained = self.explainer.explain(batch.counts)  # no inference_mode: attributions need autograd
        cells = batch.cells or [None] * batch.n_cells
        fields = self._batch_fields(batch)
        fields["explanation_genes"] = explained.genes
        fields["label_key"] = self.explainer.label_key
        fields["driver_method"] = explained.driver_method
        fields["explanations"] = [{"cell": cell, **record} for cell, record in zip(cells, explained.records(), strict=True)]
        return orjson.dumps(fields, option=JSON_OPTIONS)

    def _batch_fields(self, batch: CellBatch) -> dict[str, Any]:
        return {
            "model": self.resolved.name,
            "model_version": self.resolved.version,
            "n_cells": batch.n_cells,
            "cells": batch.cells,
            "missing_genes": batch.missing_genes,
            "n_unknown_genes": batch.n_unknown_genes,
        }

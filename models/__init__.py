"""scdgm models: one interface (models.base.GenerativeModel) for AE, VAE, LDVAE, WGAN, DBM and PCA."""
from __future__ import annotations

import importlib

from scdgm.models.base import Embedding, GenerativeModel, Samples
from scdgm.errors import ScdgmError

MODEL_CLASSES: dict[str, str] = {
    "ae": "scdgm.models.ae:Autoencoder",
    "vae": "scdgm.models.vae:VAE",
    "ldvae": "scdgm.models.vae:LDVAE",
    "gan": "scdgm.models.gan:WGAN",
    "dbm": "scdgm.models.dbm:DBM",
    "pca": "scdgm.models.pca:PCA",
}
MODEL_KINDS = tuple(MODEL_CLASSES)


def model_class(kind: str) -> type[GenerativeModel]:
    """The class implementing model `kind` (imported on first use)."""
    if kind not in MODEL_CLASSES:
        raise ScdgmError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    module, _, name = MODEL_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def create_model(kind: str, params: dict | None = None) -> GenerativeModel:
    """A fresh, unfitted model of `kind` with hyperparameters `params` (unknown keys are an error)."""
    return model_class(kind).from_params(params or {})


def load_model(directory: str) -> GenerativeModel:
    """Load a model directory written by `GenerativeModel.save`."""
    return GenerativeModel.load(directory)


__all__ = ["Embedding", "GenerativeModel", "Samples", "MODEL_KINDS", "model_class", "create_model", "load_model"]

"""scdgm models: one interface (`GenerativeModel`) for AE, VAE, LDVAE, WGAN, DBM and PCA, and the capabilities a
model declares by type (`LinearDecoder`: gene loadings; `CountEncoder`: a differentiable encoder of counts).

    from scdgm.models import VAE
    model = VAE(n_latent=10)
    model.fit(adata, layer="counts")
    model.embed(adata, layer="counts")  # also adata.obsm["X_scdgm"], adata.obsm["X_scdgm_var"]
"""
from __future__ import annotations

from scdgm.models.ae import Autoencoder
from scdgm.models.base import CountEncoder, Embedding, GenerativeModel, LinearDecoder, Samples, TrainingHistory
from scdgm.models.dbm import DBM
from scdgm.models.gan import WGAN
from scdgm.models.pca import PCA
from scdgm.models.vae import LDVAE, VAE

MODEL_CLASSES: dict[str, type[GenerativeModel]] = {
    model.kind: model for model in (Autoencoder, VAE, LDVAE, WGAN, DBM, PCA)
}
MODEL_KINDS = tuple(MODEL_CLASSES)


def model_class(kind: str) -> type[GenerativeModel]:
    """The class implementing model `kind`; a user error naming the known kinds otherwise."""
    return GenerativeModel.class_of(kind)


def create_model(kind: str, params: dict | None = None) -> GenerativeModel:
    """A fresh, unfitted model of `kind` with hyperparameters `params` (unknown keys are an error)."""
    return model_class(kind).from_params(params or {})


def load_model(directory: str) -> GenerativeModel:
    """Load a model directory written by `GenerativeModel.save`."""
    return GenerativeModel.load(directory)


__all__ = [
    "Autoencoder", "VAE", "LDVAE", "WGAN", "DBM", "PCA",
    "GenerativeModel", "LinearDecoder", "CountEncoder", "Embedding", "Samples", "TrainingHistory",
    "MODEL_CLASSES", "MODEL_KINDS", "model_class", "create_model", "load_model",
]

"""Held-out evaluation shared by every model: likelihood, reconstruction, fidelity of synthetic cells, latent quality.

Synthetic cells (posterior draws of the held-out cells, and as many prior draws) are compared with the held-out
cells in one fixed PCA space fitted on the training cells: MMD with an RBF kernel and a classifier two-sample
test (AUC 0.5 = indistinguishable). Latent quality, when obs['cell_type'] exists: kNN label accuracy from
training to held-out embeddings, and the silhouette of the held-out embedding. At most `MAX_CELLS` cells of
each split are used, drawn with a fixed seed, so evaluation stays fast and repeatable.
"""
from __future__ import annotations

from typing import Any, Literal, Protocol

import anndata as ad
import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from scdgm.errors import InputError
from scdgm.models.data import model_counts, split_mask

MAX_CELLS = 2000
TARGET_SUM = 1e4
serial_blas = threadpool_limits.wrap(limits=1, user_api="blas")
"""The matrices here are small: one BLAS thread is as fast, and far faster when the cores are oversubscribed
(OpenBLAS threads spinning against torch's OpenMP threads slowed a PCA 30-fold in our measurements)."""
# scikit-learn is imported inside the functions that use it: it takes about a second to import, and most users
# of scdgm.models (training, serving) never evaluate.


class EvaluatedModel(Protocol):
    """What evaluation uses of a model (the GenerativeModel interface; declared here so that models.base, which
    calls evaluation, is not imported back)."""

    genes: list[str]
    output: Literal["counts", "binary"]

    def heldout_nll(self, adata: ad.AnnData) -> dict[str, float]: ...

    def reconstruct(self, adata: ad.AnnData) -> np.ndarray: ...

    def sample(self, adata: ad.AnnData | None = None, n: int | None = None, source: Any = "posterior",
               draws: int = 1, seed: int | None = None) -> Any: ...

    def embed(self, adata: ad.AnnData, layer: str | None = None, key_added: str | None = "X_scdgm") -> Any: ...


@serial_blas
def evaluate_model(
    model: EvaluatedModel, adata: ad.AnnData, split: str | None = "test", seed: int = 0
) -> dict[str, float]:
    """Metrics of `model` on the cells of `split` (all cells when None or without obs['split'])."""
    heldout = _subsample(adata[split_mask(adata, split)], seed)
    if heldout.n_obs == 0:
        raise InputError(f"no cells in split {split!r} to evaluate on")
    train_mask = split_mask(adata, "train")
    train = _subsample(adata[train_mask] if train_mask.any() else adata, seed)
    binary = model.output == "binary"
    counts = model_counts(heldout, model.genes)

    metrics = {key: float(value) for key, value in model.heldout_nll(heldout).items()}
    metrics.update(reconstruction_metrics(model.reconstruct(heldout), counts, binary))

    space = PCASpace(binary=binary, seed=seed).fit(model_counts(train, model.genes))
    reference = space.transform(counts)
    draws = {
        "posterior": model.sample(heldout, source="posterior", seed=seed),
        "prior": model.sample(n=heldout.n_obs, source="prior", seed=seed),
    }
    for source, samples in draws.items():
        synthetic = space.transform(samples.x)
        metrics[f"mmd_{source}"] = mmd_rbf(synthetic, reference)
        metrics[f"c2st_{source}"] = c2st_auc(synthetic, reference, seed=seed)

    if "cell_type" in adata.obs:
        metrics.update(latent_metrics(model, train, heldout))
    return metrics


def _subsample(adata: ad.AnnData, seed: int) -> ad.AnnData:
    if adata.n_obs <= MAX_CELLS:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, MAX_CELLS, replace=False))
    return adata[keep]


def reconstruction_metrics(expected: np.ndarray, counts: sp.spmatrix | np.ndarray, binary: bool) -> dict[str, float]:
    """Counts: MSE of log1p expression and mean per-cell Pearson r of log1p; binary: BCE and accuracy vs counts > 0."""
    observed = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    expected = np.asarray(expected, dtype=np.float64)
    if binary:
        target = observed > 0
        p = np.clip(expected, 1e-7, 1 - 1e-7)
        bce = -(target * np.log(p) + (~target) * np.log1p(-p)).mean()
        return {"reconstruction_bce": float(bce), "reconstruction_accuracy": float(((p > 0.5) == target).mean())}
    predicted, actual = np.log1p(np.clip(expected, 0, None)), np.log1p(observed.astype(np.float64))
    return {
        "reconstruction_mse_log1p": float(((predicted - actual) ** 2).mean()),
        "reconstruction_pearson": _mean_row_correlation(predicted, actual),
    }


def _mean_row_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denominator = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    valid = denominator > 0
    return float(((a * b).sum(1)[valid] / denominator[valid]).mean()) if valid.any() else float("nan")


class PCASpace:
    """A fixed PCA space (≤ 50 components) of log-normalised expression — 0/1 expression for binary models —
    fitted on reference cells, so real and synthetic cells are compared in the same coordinates."""

    def __init__(self, n_components: int = 50, binary: bool = False, seed: int = 0) -> None:
        self.n_components = n_components
        self.binary = binary
        self.seed = seed
        self.pca = None

    def features(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Dense features: log1p of counts per 10k (cells with no counts stay zero), or counts > 0."""
        matrix = sp.csr_matrix(counts, dtype=np.float64)
        if self.binary:
            return (matrix > 0).toarray().astype(np.float64)
        totals = np.asarray(matrix.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        return np.log1p(sp.diags(scale) @ matrix).toarray()

    @serial_blas
    def fit(self, counts: sp.spmatrix | np.ndarray) -> PCASpace:
        from sklearn.decomposition import PCA

        features = self.features(counts)
        components = max(1, min(self.n_components, features.shape[0] - 1, features.shape[1]))
        self.pca = PCA(n_components=components, svd_solver="randomized", random_state=self.seed).fit(features)
        return self

    @serial_blas
    def transform(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        if self.pca is None:
            raise InputError("PCASpace.transform called before fit")
        return self.pca.transform(self.features(counts))


@serial_blas
def mmd_rbf(a: np.ndarray, b: np.ndarray) -> float:
    """Biased squared MMD between samples `a` and `b` with k(x, y) = exp(-|x - y|^2 / m), m the median squared
    distance over all pairs of the pooled samples (the median heuristic); 0 when the samples coincide."""
    from sklearn.metrics.pairwise import euclidean_distances

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    blocks = {
        "aa": euclidean_distances(a, squared=True),
        "bb": euclidean_distances(b, squared=True),
        "ab": euclidean_distances(a, b, squared=True),
    }
    pairs = np.concatenate([blocks["aa"][np.triu_indices(len(a), 1)], blocks["bb"][np.triu_indices(len(b), 1)]])
    median = np.median(np.concatenate([pairs, blocks["ab"].ravel()]))
    if median <= 0:
        return 0.0
    kernel = {key: np.exp(-value / median).mean() for key, value in blocks.items()}
    return float(max(kernel["aa"] + kernel["bb"] - 2 * kernel["ab"], 0.0))


@serial_blas
def c2st_auc(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Classifier two-sample test: cross-validated (5-fold, seeded) ROC AUC of a logistic regression telling `a`
    from `b`; 0.5 means indistinguishable, 1 perfectly separable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.vstack([a, b]).astype(np.float64)
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = min(5, len(a), len(b))
    if folds < 2:
        raise InputError("c2st_auc needs at least 2 samples on each side")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


@serial_blas
def knn_accuracy(
    z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, k: int = 15
) -> float:
    """Accuracy of a k-nearest-neighbour classifier trained on (z_train, y_train), on the test cells."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=min(k, len(z_train))).fit(z_train, np.asarray(y_train))
    return float(classifier.score(z_test, np.asarray(y_test)))


def latent_metrics(model: EvaluatedModel, train: ad.AnnData, heldout: ad.AnnData) -> dict[str, float]:
    """kNN accuracy of obs['cell_type'] from training to held-out embeddings, and the held-out silhouette."""
    from sklearn.metrics import silhouette_score

    labels_train = train.obs["cell_type"].astype(str).to_numpy()
    labels_test = heldout.obs["cell_type"].astype(str).to_numpy()
    z_test = model.embed(heldout, key_added=None).mean
    z_train = model.embed(train, key_added=None).mean
    metrics = {"knn_accuracy": knn_accuracy(z_train, labels_train, z_test, labels_test)}
    if 2 <= len(set(labels_test)) < len(labels_test):
        metrics["silhouette"] = float(silhouette_score(z_test, labels_test))
    return metrics

"""The scdgm model as an MLflow pyfunc: a thin PythonModel around a scdgm model directory, so MLflow (model
registry, `mlflow models serve`, `mlflow.pyfunc.load_model`) can load and call any scdgm model.

Inside a logged model the model directory is `artifacts/model_dir/` (config.json, genes.txt,
weights.safetensors, and explanation/ when one is attached). `predict` takes a DataFrame of raw counts
(integers) with gene names as columns — matched by name; missing genes count as zero, unknown ones are
ignored — and returns the latent mean (`latent_0`...) and, with an explanation, each cell's `pattern` and
transferred `label`. The class is pickled by reference, so loading needs scdgm installed (`--env-manager local`).
"""
from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import scipy.sparse as sp
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from scdgm.errors import ScdgmError
from scdgm.formats import EXPLANATION_DIR, MODEL_DIR_ARTIFACT, RUN_RECORD
from scdgm.interpret.explainer import Explainer
from scdgm.models.base import GenerativeModel
from scdgm.models.data import align_genes

REQUIREMENTS = (
    "torch", "mlflow", "numpy", "pandas", "scipy", "anndata", "safetensors", "scikit-learn", "statsmodels", "pyyaml",
)
INPUT_EXAMPLE_CELLS = 3


def latent_columns(n_latent: int) -> list[str]:
    """Names of the embedding columns `predict` returns."""
    return [f"latent_{i}" for i in range(n_latent)]


def pip_requirements() -> list[str]:
    """The third-party packages a loaded model imports, pinned to the versions installed here (scdgm itself
    is not on PyPI: serve with `--env-manager local` in an environment where scdgm is installed)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pinned


class ScdgmPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the model directory once; `predict` embeds cells, and explains them when an explanation is there."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        directory = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        self.explainer: Explainer | None = None
        if (directory / EXPLANATION_DIR).is_dir():
            self.explainer = Explainer.load(directory)
            self.model: GenerativeModel = self.explainer.model
        else:
            self.model = GenerativeModel.load(directory)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Latent mean per cell (rows keep the input's index), plus pattern and label with an explanation."""
        frame = pd.DataFrame(model_input)
        key = self.model.batch_key
        batch = frame.pop(key).astype(str).tolist() if key is not None and key in frame else None
        genes = [str(c) for c in frame.columns]
        counts = sp.csr_matrix(frame.to_numpy(dtype=np.float32).reshape(len(frame), len(genes)))
        aligned, _, _ = align_genes(counts, genes, self.model.genes)
        if self.explainer is not None:
            explained = self.explainer.explain(aligned, batch)
            result = pd.DataFrame(explained.mean, index=frame.index, columns=latent_columns(explained.mean.shape[1]))
            result["pattern"] = explained.patterns
            if explained.labels is not None:
                result["label"] = explained.labels
            return result
        embedding = self.model.embed_counts(aligned, batch)
        return pd.DataFrame(embedding.mean, index=frame.index, columns=latent_columns(embedding.mean.shape[1]))


def signature(model: GenerativeModel, explanation_columns: list[str]) -> ModelSignature:
    """Inputs: one optional integer count column per model gene (plus the batch column when the model has
    a batch covariate); outputs: the latents, then the explanation's columns."""
    inputs = [ColSpec("long", gene, required=False) for gene in model.genes]
    if model.batch_key is not None:
        inputs.append(ColSpec("string", model.batch_key))
    outputs = [ColSpec("double", name) for name in latent_columns(model.n_latent)]
    outputs += [ColSpec("string", name) for name in explanation_columns]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(model: GenerativeModel) -> pd.DataFrame:
    """A few cells with one count each, over the model's genes (and its first batch): the input layout."""
    genes = list(model.genes)
    values = np.zeros((INPUT_EXAMPLE_CELLS, len(genes)), dtype=np.int64)
    for row in range(INPUT_EXAMPLE_CELLS):
        values[row, row % max(len(genes), 1)] = 1
    example = pd.DataFrame(values, columns=genes)
    if model.batch_key is not None:
        example[model.batch_key] = model.batch_categories[0]
    return example


def explanation_folder(model_dir: Path, explanation: str | Path | None = None) -> Path | None:
    """The explanation to attach: `explanation` when given, else the model directory's own, if any."""
    folder = Path(explanation) if explanation is not None else Path(model_dir) / EXPLANATION_DIR
    if explanation is not None and not folder.is_dir():
        raise ScdgmError(f"explanation folder not found: {folder}")
    return folder if folder.is_dir() else None


def log_pyfunc(model_dir: str | Path, name: str = "model", explanation: str | Path | None = None) -> str:
    """Log `model_dir` (with `explanation` attached as its explanation/, when given) as a pyfunc model of the
    active run, copied as `artifacts/model_dir/`; returns the logged model's URI (`models:/<model id>`)."""
    model_dir = Path(model_dir)
    attached = explanation_folder(model_dir, explanation)
    with tempfile.TemporaryDirectory(prefix="scdgm-pyfunc-") as staging:
        staged = Path(staging) / MODEL_DIR_ARTIFACT
        shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns(RUN_RECORD, EXPLANATION_DIR))
        if attached is not None:
            shutil.copytree(attached, staged / EXPLANATION_DIR, ignore=shutil.ignore_patterns(RUN_RECORD))
            explainer = Explainer.load(staged)
            model, columns = explainer.model, ["pattern"] + (["label"] if explainer.label_key else [])
        else:
            model, columns = GenerativeModel.load(staged), []
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ScdgmPyfunc(),
            artifacts={MODEL_DIR_ARTIFACT: str(staged)},
            signature=signature(model, columns),
            input_example=input_example(model),
            pip_requirements=pip_requirements(),
        )
    return info.model_uri

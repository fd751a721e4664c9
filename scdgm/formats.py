"""File names and layouts shared across packages: the model directory, its explanation, the logged MLflow model."""
from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.json"  # model kind, hyperparameters, format version
GENES_FILE = "genes.txt"  # one gene per line, the order of the count matrix's columns
WEIGHTS_FILE = "weights.safetensors"  # tensors only: no pickle anywhere
METRICS_FILE = "metrics.json"  # validation/held-out figures written next to the model by `scdgm train`
RUN_RECORD = "mlflow_run.json"  # the MLflow run (tracking URI, run id) that produced a model directory
EXPLANATION_DIR = "explanation"  # `scdgm explain`'s output inside (or beside) a model directory
EXPLANATION_FILE = "explanation.json"  # the explanation report
REFERENCE_FILE = "reference.json"  # what serving needs to explain new cells
MODEL_DIR_ARTIFACT = "model_dir"  # inside a logged pyfunc model: artifacts/model_dir/ holds the model directory
MODEL_FILES = (CONFIG_FILE, GENES_FILE, WEIGHTS_FILE)  # what every saved model directory holds


def is_model_directory(path: str | Path) -> bool:
    """True when `path` holds a saved scdgm model (config, genes and weights)."""
    return all((Path(path) / name).is_file() for name in MODEL_FILES)

CHAMPION = "champion"
"""The model name (`scdgm train --model`, params.yaml register.model) meaning the family a sweep picked."""

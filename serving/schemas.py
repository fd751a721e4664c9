"""Typed request and response models of the HTTP API; they define the OpenAPI schema.

Requests are parsed by serving.inputs (orjson + numpy, far faster than validating millions of floats one by
one); the request models here document the accepted bodies and match what serving.inputs enforces.
Responses are serialised with orjson in serving.service and conform to the response models.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scdgm.models.data import MAX_COUNT

Count = Annotated[float, Field(strict=True, ge=0, le=MAX_COUNT)]
"""A count: a JSON number (not true/false, not text) in [0, 2**24], what float32 holds exactly."""
Position = Annotated[int, Field(strict=True, ge=0)]
"""An index or size: a non-negative JSON integer (not true/false)."""
_GENES = Field(min_length=1, description="Gene names of the columns, unique; matched to the model's genes by name.")
_CELLS = Field(None, description="Optional cell ids (unique, one per cell), echoed in the response.")


class DenseCells(BaseModel):
    """Cells × genes counts as one list of numbers per cell."""

    model_config = ConfigDict(extra="forbid")
    genes: list[str] = _GENES
    counts: list[list[Count]] = Field(min_length=1, description="Counts in [0, 2**24]; row i is cell i.")
    cells: list[str] | None = _CELLS


class SparseCells(BaseModel):
    """Cells × genes counts in compressed sparse row (CSR) form, as scipy.sparse.csr_matrix keeps them."""

    model_config = ConfigDict(extra="forbid")
    genes: list[str] = _GENES
    shape: list[Position] = Field(min_length=2, max_length=2, description="[n_cells, n_genes].")
    indices: list[Position] = Field(description="Gene position of each stored value.")
    indptr: list[Position] = Field(description="Row i holds values indptr[i]:indptr[i+1]; n_cells + 1 entries.")
    data: list[Count] = Field(description="The stored (non-zero) counts, in [0, 2**24].")
    cells: list[str] | None = _CELLS


class H5adUpload(BaseModel):
    """An .h5ad file (counts in layers['counts'] or .X; genes are var_names, cell ids obs_names)."""

    file: bytes = Field(json_schema_extra={"format": "binary"}, description="The .h5ad file.")


def request_examples(genes: list[str]) -> dict[str, dict[str, Any]]:
    """OpenAPI examples of /v1/embed and /v1/explain for a model with `genes`: the same two cells (3 counts of
    the first gene and 1 of the third; 5 of the second) as dense and as sparse JSON. They list every model gene,
    so they are valid requests for the served model whatever --max-missing-fraction is."""
    counts = [[0] * len(genes) for _ in range(2)]
    for row, column, value in ((0, 0, 3), (0, 2, 1), (1, 1, 5)):
        if column < len(genes):
            counts[row][column] = value
    indptr, indices, data = [0], [], []
    for row in counts:
        indices += [j for j, value in enumerate(row) if value]
        data += [value for value in row if value]
        indptr.append(len(indices))
    cells = ["cell-1", "cell-2"]
    sparse = {"genes": genes, "shape": [2, len(genes)], "indptr": indptr, "indices": indices, "data": data}
    return {
        "dense": {"summary": "two cells, dense", "value": {"genes": genes, "counts": counts, "cells": cells}},
        "sparse": {"summary": "the same two cells, sparse CSR", "value": {**sparse, "cells": cells}},
    }


def cells_request_body() -> dict[str, Any]:
    """OpenAPI requestBody of /v1/embed and /v1/explain: dense or sparse JSON, or a multipart .h5ad upload."""
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [DenseCells.model_json_schema(), SparseCells.model_json_schema()]}},
            "multipart/form-data": {"schema": H5adUpload.model_json_schema()},
        },
    }


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a one-line message and the request id (also in the X-Request-ID header)."""

    detail: str
    request_id: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str


class ModelInfo(BaseModel):
    """What the server serves."""

    name: str = Field(description="Registered model name, logged model id, or model directory name.")
    version: str | None = Field(description="Registry version (or run id for runs:/ URIs); null for a directory.")
    uri: str = Field(description="The model URI the server was started with.")
    kind: str = Field(description="Model kind: ae, vae, ldvae, gan, dbm or pca.")
    n_genes: int
    genes: list[str] = Field(description="Expected genes, in the model's order.")
    n_latent: int
    has_explanation: bool
    explanation_genes: list[str] = Field(description="Genes of the log-linear explanation (empty without one).")
    label_key: str | None = Field(description="The obs column whose labels /v1/explain transfers, if any.")


class BatchResponse(BaseModel):
    """What every cell-batch answer carries: the model, the cells, and how their genes matched the model's."""

    model: str
    model_version: str | None
    n_cells: int
    cells: list[str] | None = Field(description="The request's cell ids (obs_names of an upload), else null.")
    missing_genes: list[str] = Field(description="Model genes absent from the request, filled with zeros.")
    n_unknown_genes: int = Field(description="Request genes the model does not know (ignored).")


class EmbedResponse(BatchResponse):
    """Latent position of each cell."""

    latent_mean: list[list[float]] = Field(description="n_cells × n_latent posterior means.")
    latent_var: list[list[float]] = Field(description="n_cells × n_latent posterior variances.")


class DrivingGene(BaseModel):
    gene: str
    score: float = Field(description=(
        "How far the gene, expressed above a typical cell, moves the cell away from the average cell in "
        "standardised latent space (loading term for linear models, integrated gradients from the typical cell "
        "otherwise), times the gene weight mean count / (1 + mean count)."))


class CellExplanation(BaseModel):
    """The log-linear explanation of one cell (interpret.explainer.CellExplanations.records, plus its id)."""

    cell: str | None
    latent_mean: list[float]
    latent_var: list[float]
    pattern: str = Field(description="0/1 string over the explanation genes (the cell's discretised counts).")
    matched_pattern: str = Field(description="The nearest pattern (Hamming) among the reference's real cells.")
    pattern_distance: int = Field(description="Hamming distance to the matched pattern (0 when seen).")
    pattern_frequency: int = Field(description="Reference cells that had the matched pattern.")
    label: str | None = Field(description="Label transferred from the matched pattern (null without labels).")
    label_support: float | None = Field(description="Share of the matched pattern's cells with that label.")
    label_assigned: bool | None = Field(description=(
        "True when the explanation's abstention rule labels the cell: its pattern within explain.abstain_distance "
        "(Hamming) of a seen one, seen in at least explain.abstain_min_cells reference cells (coverage and accuracy "
        "of this rule on held-out cells: label_transfer.heldout in explanation.json)."))
    assigned_label: str | None = Field(description="label when label_assigned, else 'unassigned'.")
    dominant_latent: int = Field(description="The latent on which the cell is furthest from the average cell.")
    drivers: list[DrivingGene] = Field(description="Genes that drive the cell away from the average cell, "
                                                   "largest score first.")


class ExplainResponse(BatchResponse):
    """Per cell: the embedding, its pattern, the matched reference pattern, the label and the driving genes."""

    explanation_genes: list[str] = Field(description="Position k of every pattern is gene k of this list.")
    label_key: str | None = Field(description="The obs column whose labels the explanation transfers.")
    driver_method: str | None = Field(description="'loadings', 'integrated_gradients', or null.")
    explanations: list[CellExplanation]

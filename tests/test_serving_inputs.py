"""Request bodies outside the input domain get 422 with the JSON error shape, never a 5xx: counts beyond 2**24
(what float32 holds exactly), JSON true/false among counts or positions, unevenly nested lists. The request
models of the OpenAPI schema refuse the same bodies. A damaged model folder fails the server's start-up with
one line. Served by the real app (FastAPI's TestClient runs its lifespan, which loads the model)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from scdgm.errors import ScdgmError
from scdgm.pipelines.simulate import simulate_programs
from scdgm.pipelines.train import save_model_dir, train_model
from scdgm.serving.app import create_app
from scdgm.serving.schemas import DenseCells, SparseCells
from scdgm.serving.service import ModelService
from scdgm.serving.settings import ServeSettings

N_GENES = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cells = simulate_programs(150, N_GENES, n_types=2, n_programs=2, genes_per_program=3, seed=2)
    model, metrics = train_model("pca", cells, {"n_latent": 2})
    return save_model_dir(model, metrics, tmp_path_factory.mktemp("served") / "pca")


@pytest.fixture(scope="module")
def client(model_dir) -> Iterator[TestClient]:
    settings = ServeSettings(model_uri=str(model_dir), access_log=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def genes(model_dir) -> list[str]:
    return (model_dir / "genes.txt").read_text().split()


def dense(genes: list[str], *rows: list) -> dict:
    return {"genes": genes, "counts": [list(row) for row in rows]}


def sparse(genes: list[str], indices: list, data: list) -> dict:
    return {"genes": genes, "shape": [1, len(genes)], "indptr": [0, len(indices)], "indices": indices, "data": data}


def zeros(n: int, **at: object) -> list:
    row: list = [0] * n
    for position, value in at.items():
        row[int(position.removeprefix("g"))] = value
    return row


BAD_BODIES = {
    # name: (body builder given the genes, text the detail holds)
    "dense count 2**70": (lambda g: dense(g, zeros(N_GENES, g1=2**70)), "above 2**24"),
    "dense count 1e12": (lambda g: dense(g, zeros(N_GENES, g1=1e12)), "above 2**24"),
    "dense 2**24 + 2": (lambda g: dense(g, zeros(N_GENES, g1=2**24 + 2)), "above 2**24"),
    "dense true among numbers": (lambda g: dense(g, zeros(N_GENES, g3=True)), "counts[0][3]"),
    "dense false among numbers": (lambda g: dense(g, zeros(N_GENES, g0=False, g1=1.5)), "counts[0][0]"),
    "dense only booleans": (lambda g: dense(g, [True] * N_GENES), "got true/false"),
    "sparse data 2**70": (lambda g: sparse(g, [0, 2], [1, 2**70]), "above 2**24"),
    "sparse data true": (lambda g: sparse(g, [0, 2], [1, True]), "data[1] must be a number, got true/false"),
    "sparse index true": (lambda g: sparse(g, [0, True], [1, 2]), "indices must be a flat list of integers"),
    "sparse indptr true": (lambda g: {**sparse(g, [0], [1]), "indptr": [False, 1]}, "indptr must be"),
    "sparse data nested unevenly": (lambda g: sparse(g, [0, 2], [[1, 2], [3]]), "data must be a flat list"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_out_of_domain_json_is_422_with_one_line(name, client, genes):
    build, expected = BAD_BODIES[name]
    response = client.post("/v1/embed", content=json.dumps(build(genes)), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail", "request_id"}
    assert expected in body["detail"] and "\n" not in body["detail"], body["detail"]


def test_the_request_models_refuse_the_same_bodies(genes):
    for name, (build, _) in BAD_BODIES.items():
        body = json.dumps(build(genes))
        model = SparseCells if "sparse" in name else DenseCells
        with pytest.raises(ValidationError):
            model.model_validate_json(body)
    DenseCells.model_validate_json(json.dumps(dense(genes, zeros(N_GENES, g1=2**24))))
    SparseCells.model_validate_json(json.dumps(sparse(genes, [0, 2], [1, 2**24])))


def test_counts_at_the_limit_and_gene_names_spelling_true_are_fine(client, genes, model_dir):
    body = dense(genes, zeros(N_GENES, g1=2**24), zeros(N_GENES, g2=3))
    response = client.post("/v1/embed", json=body)
    assert response.status_code == 200, response.text
    renamed = [*genes[:-1], "untrue-false"]  # 'true' in the body, not as a value: takes the exact scan, passes
    response = client.post("/v1/embed", json=dense(renamed, zeros(N_GENES, g2=3)))
    assert response.status_code == 200 and response.json()["missing_genes"] == [genes[-1]]


def test_a_damaged_model_fails_start_up_with_one_line(model_dir, tmp_path):
    damaged = shutil.copytree(model_dir, tmp_path / "pca")
    document = json.loads((damaged / "config.json").read_text())
    document["config"]["n_latent"] = 5
    (damaged / "config.json").write_text(json.dumps(document))
    settings = ServeSettings(model_uri=str(damaged), access_log=False)
    with pytest.raises(ScdgmError) as failure:
        ModelService.load(settings)
    message = str(failure.value)
    assert "weights.safetensors" in message and "shape" in message and "\n" not in message
    with pytest.raises(ScdgmError, match="weights.safetensors"), TestClient(create_app(settings)):
        pass

"""The HTTP API against real servers on 127.0.0.1: uvicorn in a thread or as `scdgm serve` in a subprocess,
Ray Serve (and a replica killed mid-request), a registered MLflow model, schemathesis fuzzing, a bounded load
test, and the champion that the DVC pipeline registers on PBMC 3k (the session's `pbmc_project`).

One small LDVAE is trained on simulated data (prepared like real data) and explained once for the module.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pytest
import scipy.sparse as sp
import uvicorn
from pbmc_project import PbmcProject

from scdgm.interpret.explain import run_explanation
from scdgm.interpret.explainer import Explainer
from scdgm.models import load_model
from scdgm.pipelines.prepare import prepare
from scdgm.pipelines.simulate import simulate_programs
from scdgm.pipelines.train import save_model_dir, train_model
from scdgm.serving.app import create_app
from scdgm.serving.loadgen import free_port, run_load, wait_until_ready
from scdgm.serving.service import ModelService
from scdgm.serving.settings import ServeSettings

HOST = "127.0.0.1"
SCDGM = [sys.executable, "-c", "from scdgm.pipelines.cli import main; main()"]
LIMITS = {"max_cells": 50, "max_body_mb": 1.0, "max_missing_fraction": 0.5, "access_log": False}


# --- fixtures ---------------------------------------------------------------------------------------------
class ThreadServer:
    """uvicorn serving `app` from a background thread on a free loopback port."""

    def __init__(self, app: object, lifespan: str = "on") -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host=HOST, port=self.port, lifespan=lifespan, access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def prepared() -> ad.AnnData:
    raw = simulate_programs(700, 300, n_types=4, n_programs=5, genes_per_program=15, seed=0)
    return prepare(raw, {"min_genes": 5, "max_genes": None, "min_cells": 3, "n_top_genes": 200}, label_key="cell_type")


@pytest.fixture(scope="module")
def model_dir(prepared: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained, explained LDVAE directory."""
    directory = tmp_path_factory.mktemp("served") / "ldvae"
    params = {"max_epochs": 8, "n_latent": 4, "n_hidden": 32, "progress": False, "device": "cpu", "n_importance": 5}
    model, metrics = train_model("ldvae", prepared, params)
    save_model_dir(model, metrics, directory)
    run_explanation(model, prepared, directory / "explanation", n_genes=4, permutations=10, plots=False)
    return directory


@pytest.fixture(scope="module")
def test_cells(prepared: ad.AnnData) -> ad.AnnData:
    return prepared[prepared.obs["split"] == "test"].copy()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(ServeSettings(model_uri=str(model_dir), **LIMITS))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def dense(adata: ad.AnnData, **extra: object) -> dict:
    return {"genes": list(adata.var_names), "counts": adata.X.toarray().astype(int).tolist(), **extra}


def sparse(adata: ad.AnnData) -> dict:
    m = sp.csr_matrix(adata.X)
    return {"genes": list(adata.var_names), "shape": list(m.shape), "indices": m.indices.tolist(),
            "indptr": m.indptr.tolist(), "data": m.data.tolist()}


def h5ad_bytes(adata: ad.AnnData) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cells.h5ad"
        adata.write_h5ad(path)
        return path.read_bytes()


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    """An error answer: the status, a one-line JSON detail containing `fragment`, the echoed request id."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "request_id"}
    assert fragment in body["detail"], body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and "\n" not in body["detail"]


# --- endpoints ----------------------------------------------------------------------------------------------
def test_health_ready_and_model_info(client: httpx.Client, model_dir: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": "ldvae"}
    info = client.get("/v1/model").json()
    model = load_model(model_dir)
    reference = json.loads((model_dir / "explanation" / "reference.json").read_text())
    assert info["genes"] == model.genes and info["n_genes"] == len(model.genes) == 200
    assert (info["kind"], info["n_latent"], info["version"], info["label_key"]) == ("ldvae", 4, None, "cell_type")
    assert info["has_explanation"] and info["explanation_genes"] == reference["genes"]


def test_request_id_is_echoed_or_made(client: httpx.Client) -> None:
    assert client.get("/health", headers={"X-Request-ID": "req-42"}).headers["x-request-id"] == "req-42"
    made = client.get("/health", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert len(made) == 32 and " " not in made


def test_embed_formats_agree_with_the_model(client: httpx.Client, model_dir: Path, test_cells: ad.AnnData) -> None:
    cells = test_cells[:6]
    expected = load_model(model_dir).embed(cells)
    ids = [f"c{i}" for i in range(6)]
    answers = [
        client.post("/v1/embed", json=dense(cells, cells=ids)),
        client.post("/v1/embed", json=sparse(cells)),
        client.post("/v1/embed", files={"file": ("cells.h5ad", h5ad_bytes(cells))}),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["n_cells"] == 6 and body["missing_genes"] == [] and body["n_unknown_genes"] == 0
        np.testing.assert_allclose(body["latent_mean"], expected.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(body["latent_var"], expected.var, rtol=1e-5, atol=1e-6)
    assert answers[0].json()["cells"] == ids
    assert answers[1].json()["cells"] is None
    assert answers[2].json()["cells"] == list(cells.obs_names)


def test_genes_are_aligned_by_name(client: httpx.Client, model_dir: Path, test_cells: ad.AnnData) -> None:
    cells = test_cells[:4]
    genes = list(cells.var_names)
    dropped = genes[:3]
    rng = np.random.default_rng(0)
    order = rng.permutation(np.arange(3, len(genes)))
    counts = cells.X.toarray()[:, order]
    extra = rng.poisson(2.0, size=(4, 2))
    body = {"genes": [genes[i] for i in order] + ["NOT_A_GENE", "ALSO_NOT"],
            "counts": np.hstack([counts, extra]).astype(int).tolist()}
    answer = client.post("/v1/embed", json=body).json()
    assert answer["missing_genes"] == dropped and answer["n_unknown_genes"] == 2
    zeroed = ad.AnnData(cells.X.toarray(), var=cells.var[[]])
    zeroed.X[:, :3] = 0
    np.testing.assert_allclose(answer["latent_mean"], load_model(model_dir).embed(zeroed).mean, rtol=1e-5, atol=1e-6)


def test_explain_matches_the_explainer(client: httpx.Client, model_dir: Path, test_cells: ad.AnnData) -> None:
    cells = test_cells[:8]
    answer = client.post("/v1/explain", json=dense(cells, cells=list(cells.obs_names)))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = Explainer.load(model_dir).explain(sp.csr_matrix(cells.X))
    assert body["explanation_genes"] == expected.genes and body["label_key"] == "cell_type"
    assert body["driver_method"] == "loadings"
    assert [e["cell"] for e in body["explanations"]] == list(cells.obs_names)
    assert [e["pattern"] for e in body["explanations"]] == expected.patterns
    assert [e["label"] for e in body["explanations"]] == expected.labels
    for record in body["explanations"]:
        assert len(record["pattern"]) == len(record["matched_pattern"]) == len(expected.genes)
        assert 0 < record["label_support"] <= 1 and record["pattern_frequency"] >= 1
        assert record["label_assigned"] == (record["pattern_distance"] == 0)  # the default abstention rule
        assert record["assigned_label"] == (record["label"] if record["label_assigned"] else "unassigned")
        assert len(record["drivers"]) == 10 and 0 <= record["dominant_latent"] < 4
        assert len(record["latent_mean"]) == len(record["latent_var"]) == 4


# --- bad input ------------------------------------------------------------------------------------------------
def _bad_requests(genes: list[str]) -> list[tuple[str, dict, int, str]]:
    """(case, httpx request kwargs, status, message fragment) for every kind of bad input."""
    g = genes
    row = [1] * len(g)
    csr = {"genes": g, "shape": [1, len(g)], "indices": [0, 1], "indptr": [0, 2], "data": [1, 2]}
    return [
        ("not json", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
        ("not an object", {"json": [1, 2]}, 422, "must be a JSON object"),
        ("no fields", {"json": {}}, 422, "missing field(s) 'genes'"),
        ("unknown field", {"json": {"genes": g, "counts": [row], "extra": 1}}, 422, "unknown field(s) 'extra'"),
        ("dense and sparse", {"json": {**csr, "counts": [row]}}, 422, "not both"),
        ("genes not a list", {"json": {"genes": "CD3E", "counts": [row]}}, 422, "genes must be a non-empty list"),
        ("gene not a string", {"json": {"genes": [g[0], 7, *g[2:]], "counts": [row]}}, 422, "genes[1] is not a string"),
        ("duplicate genes", {"json": {"genes": [g[0], *g[:-1]], "counts": [row]}}, 422, f"{g[0]!r} appears more"),
        ("no cells", {"json": {"genes": g, "counts": []}}, 422, "no cells"),
        ("counts not rows", {"json": {"genes": g, "counts": row}}, 422, "counts must be a list of rows"),
        ("row not a list", {"json": {"genes": g, "counts": [row, 5]}}, 422, "counts[1] is not a list"),
        ("ragged rows", {"json": {"genes": g, "counts": [row, row[:-1]]}}, 422, f"counts[1] has {len(g) - 1} values"),
        ("string count", {"json": {"genes": g, "counts": [[1, 2, "3", *row[3:]]]}}, 422,
         f"counts[0][2] (gene {g[2]!r}) must be a number, got a string"),
        ("null count", {"json": {"genes": g, "counts": [[None, *row[1:]]]}}, 422, "got null"),
        ("negative count", {"json": {"genes": g, "counts": [row, [1, -4, *row[2:]]], "cells": ["a", "b"]}}, 422,
         f"negative values in the counts, e.g. -4.0 at cell 'b', gene {g[1]!r}"),
        ("non-integer count", {"json": {"genes": g, "counts": [[1.5, *row[1:]]]}}, 422,
         f"non-integer values in the counts, e.g. 1.5 at cell '0', gene {g[0]!r}"),
        ("overflowing count", {"json": {"genes": g, "counts": [[1e39, *row[1:]]]}}, 422, "non-finite values"),
        ("too many genes missing", {"json": {"genes": g[:10], "counts": [row[:10]]}}, 422,
         f"{len(g) - 10} of {len(g)} expected genes are missing"),
        ("cell ids wrong length", {"json": {"genes": g, "counts": [row], "cells": ["a", "b"]}}, 422, "cells has 2 ids"),
        ("duplicate cell ids", {"json": {"genes": g, "counts": [row, row], "cells": ["a", "a"]}}, 422, "'a' appears"),
        ("sparse bad shape", {"json": {**csr, "shape": [1]}}, 422, "shape must be [n_cells, n_genes]"),
        ("sparse shape vs genes", {"json": {**csr, "shape": [1, 3]}}, 422, "shape says 3 genes"),
        ("sparse indptr length", {"json": {**csr, "indptr": [0, 1, 2]}}, 422, "indptr has 3 entries"),
        ("sparse indptr decreasing", {"json": {**csr, "shape": [2, len(g)], "indptr": [0, 2, 1]}}, 422, "never decrease"),
        ("sparse lengths disagree", {"json": {**csr, "data": [1]}}, 422, "all three must agree"),
        ("sparse index out of range", {"json": {**csr, "indices": [0, len(g)]}}, 422, "gene positions in"),
        ("sparse float indices", {"json": {**csr, "indices": [0.0, 1.0]}}, 422, "indices must be a flat list of integers"),
        ("sparse duplicate gene", {"json": {**csr, "indices": [1, 1]}}, 422, f"lists gene {g[1]!r} more than once"),
        ("sparse negative", {"json": {**csr, "data": [1, -2]}}, 422, "negative values"),
        ("too many cells", {"json": {"genes": g, "counts": [row] * 51}}, 413, "at most 50"),
        ("sparse too many cells", {"json": {**csr, "shape": [51, len(g)], "indptr": [0] * 51 + [2]}}, 413, "at most 50"),
        ("body too large", {"content": b" " * (2 * 2**20), "headers": {"content-type": "application/json"}}, 413,
         "larger than this server's 1 MB"),
        ("chunked body too large", {"content": [b" " * 2**19] * 4, "headers": {"content-type": "application/json"}},
         413, "larger than this server's 1 MB"),
        ("wrong content type", {"content": b"1,2", "headers": {"content-type": "text/csv"}}, 415, "unsupported content"),
        ("no content type", {"content": b"{}"}, 415, "unsupported content type 'none'"),
        ("multipart without file", {"data": {"x": "1"}, "files": {"other": ("a", b"1")}}, 422, "named 'file'"),
        ("corrupt h5ad", {"files": {"file": ("cells.h5ad", b"not hdf5")}}, 422, "not a readable .h5ad"),
    ]


def test_bad_inputs_get_clear_4xx(client: httpx.Client, model_dir: Path) -> None:
    genes = load_model(model_dir).genes
    failures = []
    for case, request, status, fragment in _bad_requests(genes):
        for path in ("/v1/embed", "/v1/explain"):
            response = client.post(path, **request)
            try:
                assert_error(response, status, fragment)
            except AssertionError as exc:
                failures.append(f"{case} {path}: {exc}")
    assert not failures, "\n".join(failures)


def test_h5ad_values_are_checked(client: httpx.Client, test_cells: ad.AnnData) -> None:
    cells = ad.AnnData(test_cells.X[:3].toarray(), obs=test_cells.obs[:3][[]], var=test_cells.var[[]])
    cells.X[2, 5] = np.nan
    response = client.post("/v1/embed", files={"file": ("x.h5ad", h5ad_bytes(cells))})
    assert_error(response, 422, f"non-finite values (NaN or infinity) in the counts, e.g. nan at cell "
                                f"{cells.obs_names[2]!r}, gene {cells.var_names[5]!r}")
    big = ad.concat([test_cells] * 2, index_unique="-")[:51]
    assert_error(client.post("/v1/embed", files={"file": ("x.h5ad", h5ad_bytes(big))}), 413, "at most 50")


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/v2/nothing"), 404, "Not Found")
    assert_error(client.get("/v1/embed"), 405, "Method Not Allowed")


# --- start-up states, missing explanation, internal errors --------------------------------------------------
def test_not_ready_until_the_model_is_loaded(model_dir: Path) -> None:
    app = create_app(ServeSettings(model_uri=str(model_dir)))
    with ThreadServer(app, lifespan="off") as running, httpx.Client(base_url=running.url) as http:
        assert http.get("/health").status_code == 200
        assert_error(http.get("/ready"), 503, "still loading")
        assert_error(http.get("/v1/model"), 503, "still loading")
        assert_error(http.post("/v1/embed", json={}), 503, "still loading")


def test_model_without_explanation(model_dir: Path, tmp_path: Path, test_cells: ad.AnnData) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("explanation"))
    with ThreadServer(create_app(ServeSettings(model_uri=str(bare)))) as running, httpx.Client(base_url=running.url) as http:
        info = http.get("/v1/model").json()
        assert not info["has_explanation"] and info["explanation_genes"] == [] and info["label_key"] is None
        assert http.post("/v1/embed", json=dense(test_cells[:2])).status_code == 200
        assert_error(http.post("/v1/explain", json=dense(test_cells[:2])), 409, "run `scdgm explain")


def test_internal_error_is_a_bare_500(model_dir: Path, test_cells: ad.AnnData) -> None:
    settings = ServeSettings(model_uri=str(model_dir), access_log=False)
    service = ModelService.load(settings)
    service.explainer.patterns = None  # breaks /v1/explain inside the explainer
    with ThreadServer(create_app(settings, service)) as running, httpx.Client(base_url=running.url) as http:
        response = http.post("/v1/explain", json=dense(test_cells[:1]), headers={"X-Request-ID": "boom-1"})
        assert_error(response, 500, "internal server error")
        assert response.json()["request_id"] == "boom-1"
        assert "AttributeError" not in response.text
        assert http.post("/v1/embed", json=dense(test_cells[:1])).status_code == 200


def test_cors_is_off_by_default(client: httpx.Client) -> None:
    response = client.options("/v1/model", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers


# --- the command line: workers, auth, CORS, access log, load ---------------------------------------------------
@pytest.fixture(scope="module")
def cli_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`scdgm serve` with 2 workers, a token, CORS for one origin and non-integer counts allowed."""
    folder = tmp_path_factory.mktemp("cli")
    token_file = folder / "token"
    token_file.write_text("s3cret-token\n")
    port = free_port()
    command = [*SCDGM, "serve", "--model-uri", str(model_dir), "--port", str(port), "--workers", "2",
               "--token-file", str(token_file), "--cors-origin", "http://example.org", "--allow-non-integer"]
    with open(folder / "stderr.log", "w+b") as log:
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_until_ready(HOST, port, "/ready", process)
            yield {"url": f"http://{HOST}:{port}", "port": port, "token": "s3cret-token", "log": folder / "stderr.log"}
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_bearer_token_guards_v1(cli_server: dict, test_cells: ad.AnnData) -> None:
    url, token = cli_server["url"], cli_server["token"]
    assert httpx.get(f"{url}/health").status_code == 200
    missing = httpx.get(f"{url}/v1/model")
    assert_error(missing, 401, "missing bearer token")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer nope"}), 401, "wrong bearer token")
    assert_error(httpx.post(f"{url}/v1/embed", json=dense(test_cells[:1])), 401, "missing bearer token")
    good = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{url}/v1/model", headers=good).status_code == 200
    fractional = dense(test_cells[:2])
    fractional["counts"][0][0] = 0.5  # accepted: the server runs with --allow-non-integer
    assert httpx.post(f"{url}/v1/explain", json=fractional, headers=good).status_code == 200


def test_cors_origin_and_access_log(cli_server: dict) -> None:
    url = cli_server["url"]
    allowed = httpx.options(f"{url}/v1/model", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "GET"})
    assert allowed.headers["access-control-allow-origin"] == "http://example.org"
    other = httpx.options(f"{url}/v1/model", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in other.headers
    httpx.get(f"{url}/health", headers={"X-Request-ID": "log-me"})
    time.sleep(0.3)
    lines = [json.loads(line) for line in cli_server["log"].read_text().splitlines() if line.startswith("{")]
    entry = next(line for line in lines if line["request_id"] == "log-me")
    assert entry["method"] == "GET" and entry["path"] == "/health" and entry["status"] == 200
    assert entry["latency_ms"] >= 0


def test_load_16_clients_without_errors(cli_server: dict, test_cells: ad.AnnData,
                                        capsys: pytest.CaptureFixture) -> None:
    body = json.dumps(dense(test_cells[:1])).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {cli_server['token']}"}
    result = run_load(HOST, cli_server["port"], "/v1/explain", body, headers, clients=16, seconds=10.0)
    with capsys.disabled():
        print(f"\nload, 16 clients x 10 s of one-cell /v1/explain (2 workers): {result.summary()}")
    assert result.errors == 0, result.statuses
    assert result.requests > 100


def test_cli_reports_a_bad_model_uri_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}", "SCDGM_CACHE_DIR": str(tmp_path)}
    for uri, fragment in ((str(tmp_path / "nowhere"), "no such directory"), (str(tmp_path), "not a scdgm model"),
                          ("s3://bucket/model", "unsupported form"), ("models:/nope@champion", "not found")):
        done = subprocess.run([*SCDGM, "serve", "--model-uri", uri, "--port", str(free_port())],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert fragment in done.stderr and "Traceback" not in done.stderr


def test_serve_check_explains_test_cells_over_http_and_stops(model_dir: Path, prepared: ad.AnnData, tmp_path: Path) -> None:
    """`scdgm serve --check CELLS` (the end of `make demo`): a real server on a free port answers /v1/explain for
    the test cells, the command reports how many labels match and exits 0 with nothing left listening."""
    cells = tmp_path / "cells.h5ad"
    prepared.write_h5ad(cells)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}", "SCDGM_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([*SCDGM, "serve", "--model-uri", str(model_dir), "--check", str(cells), "--no-access-log"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    tested = int((prepared.obs["split"] == "test").sum())
    assert f"POST /v1/explain with {min(tested, 100)} test cells" in done.stdout and "answered 200" in done.stdout
    agree = done.stdout.split("match obs['cell_type'] for ")[1].split(" of ")[0]
    assert int(agree) > min(tested, 100) / 4  # four types: better than chance
    for argv, fragment in ((["--check", str(tmp_path / "none.h5ad")], "no such file"),
                           (["--check", str(cells), "--workers", "2"], "drop --ray and --workers")):
        refused = subprocess.run([*SCDGM, "serve", "--model-uri", str(model_dir), *argv],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert refused.returncode == 2 and fragment in refused.stderr and "Traceback" not in refused.stderr


# --- model URIs from the MLflow registry -----------------------------------------------------------------------
def test_registered_model_is_resolved_and_served(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 test_cells: ad.AnnData) -> None:
    from scdgm.errors import ScdgmError
    from scdgm.pipelines import tracking
    from scdgm.pipelines.registry import register
    from scdgm.serving.resolve import resolve_model

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow_client = tracking.client(store)
    run = mlflow_client.create_run(tracking.experiment_id("serving", store))
    logged_uri = tracking.log_pyfunc_model(run.info.run_id, model_dir)
    mlflow_client.set_terminated(run.info.run_id)
    register("served-ldvae", "champion", run_id=run.info.run_id)
    cache = tmp_path / "cache"
    for uri in ("models:/served-ldvae/1", f"runs:/{run.info.run_id}/model", logged_uri):
        resolved = resolve_model(uri, cache_dir=cache)
        assert (resolved.directory / "explanation" / "reference.json").is_file()
        assert (resolved.directory / "genes.txt").read_text() == (model_dir / "genes.txt").read_text()
    with pytest.raises(ScdgmError, match="not found in the MLflow registry"):
        resolve_model("models:/served-ldvae@nope", cache_dir=cache)
    settings = ServeSettings(model_uri="models:/served-ldvae@champion", cache_dir=str(cache), access_log=False)
    with ThreadServer(create_app(settings)) as running, httpx.Client(base_url=running.url) as http:
        info = http.get("/v1/model").json()
        assert (info["name"], info["version"], info["uri"]) == ("served-ldvae", "1", "models:/served-ldvae@champion")
        answer = http.post("/v1/explain", json=dense(test_cells[:3])).json()
        assert answer["model"] == "served-ldvae" and answer["model_version"] == "1"
        assert len(answer["explanations"]) == 3


# --- Ray Serve ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_url(model_dir: Path) -> Iterator[str]:
    """`scdgm serve --ray` in miniature: a private Ray with 2 CPUs, Serve's proxy on a free port, one replica."""
    import ray

    from scdgm.serving import ray_deployment

    settings = ServeSettings(model_uri=str(model_dir), port=free_port(), replicas=1, replica_cpus=1.0, access_log=False)
    with ray_deployment.running(settings, num_cpus=2):
        yield f"http://{HOST}:{settings.port}"
    assert not ray.is_initialized()


def test_ray_serve_deployment(ray_url: str, model_dir: Path, test_cells: ad.AnnData) -> None:
    with httpx.Client(base_url=ray_url, timeout=30) as http:
        ready = http.get("/ready", headers={"X-Request-ID": "through-ray"})
        assert ready.json()["status"] == "ready" and ready.headers["x-request-id"] == "through-ray"
        embedded = http.post("/v1/embed", json=dense(test_cells[:5]))
        assert embedded.status_code == 200, embedded.text
        np.testing.assert_allclose(embedded.json()["latent_mean"], load_model(model_dir).embed(test_cells[:5]).mean,
                                   rtol=1e-5, atol=1e-6)
        explained = http.post("/v1/explain", json=dense(test_cells[:2]))
        assert explained.status_code == 200 and len(explained.json()["explanations"]) == 2
        assert_error(http.post("/v1/embed", json={"genes": ["x"], "counts": [[-1]]}), 422, "negative values")
        body = json.dumps(dense(test_cells[:1])).encode()

        def late_body() -> Iterator[bytes]:
            yield body[:10]
            time.sleep(1.5)
            yield body[10:]

        timed_out = http.post("/v1/embed", content=late_body(),  # Ray's own plain-text 408, in the JSON error shape
                              headers={"Content-Type": "application/json", "X-Request-Timeout-Seconds": "0.5"})
        assert_error(timed_out, 408, "timed out")


def test_ray_replica_death_is_a_json_503_until_it_restarts(ray_url: str, test_cells: ad.AnnData) -> None:
    """A request in flight on a replica that dies answers 503 with Retry-After and the JSON error shape (not
    Ray's plain-text 500); Serve restarts the replica and requests then answer 200 again.

    The request is held in flight by sending its body in two parts: the replica waits for the second one."""
    import ray

    body = json.dumps(dense(test_cells[:3])).encode()
    sent_half = threading.Event()
    kill_done = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        sent_half.set()
        kill_done.wait(timeout=60)
        yield body[len(body) // 2 :]

    answers: list[httpx.Response] = []
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=ray_url, timeout=120) as http:
        assert http.post("/v1/embed", content=body, headers=headers).status_code == 200
        in_flight = threading.Thread(target=lambda: answers.append(
            http.post("/v1/embed", content=slow_body(), headers={**headers, "X-Request-ID": "in-flight"})))
        in_flight.start()
        assert sent_half.wait(timeout=30)
        time.sleep(2.0)  # the proxy hands the request to the replica as soon as its headers arrive
        replicas = [entry for entry in ray.util.list_named_actors(all_namespaces=True)
                    if entry["name"].startswith("SERVE_REPLICA::")]
        assert len(replicas) == 1, replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
        kill_done.set()
        in_flight.join(timeout=90)
        assert_error(answers[0], 503, "replica")
        assert answers[0].json()["request_id"] == "in-flight"
        assert int(answers[0].headers["retry-after"]) >= 1
        deadline = time.monotonic() + 60
        while (again := http.post("/v1/embed", content=body, headers=headers)).status_code != 200:
            assert_error(again, 503, "")
            assert "retry-after" in again.headers and time.monotonic() < deadline, "the replica did not come back"
            time.sleep(0.5)
        assert len(again.json()["latent_mean"]) == 3


# --- schemathesis ------------------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(server: ThreadServer, capsys: pytest.CaptureFixture) -> None:
    """>= 300 requests generated from our OpenAPI schema (valid and invalid data): never a 5xx, and every
    answer conforms to the documented status codes and response schemas."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import (
        FailureGroup,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    calls, failures = 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        post = operation.method.upper() == "POST"
        budget = 100 if post else 5
        for mode in list(schemathesis.GenerationMode) if post else [schemathesis.GenerationMode.POSITIVE]:

            @hypothesis.settings(max_examples=budget, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                nonlocal calls
                response = case.call(base_url=server.url)
                calls += 1
                try:
                    case.validate_response(
                        response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance]
                    )
                except (AssertionError, FailureGroup) as exc:  # collected: one run reports every kind of failure
                    failures.append(f"{case.method} {case.path} -> {response.status_code}: {str(exc)[:300]}")

            check()
    with capsys.disabled():
        print(f"\nschemathesis: {calls} requests, {len(failures)} failures")
    assert calls >= 300
    assert not failures, "\n".join(failures[:10])


# --- the README's "done when": the pipeline's registered PBMC 3k model -------------------------------------------
@pytest.mark.slow
def test_pbmc3k_champion_serves_the_test_split(pbmc_project: PbmcProject, capsys: pytest.CaptureFixture) -> None:
    """`dvc repro` on PBMC 3k registers a champion; `scdgm serve --model-uri models:/pbmc3k@champion` embeds
    and explains the test split, and the labels it transfers agree with the annotated types at least as well as
    `scdgm explain` reported (less 0.05), as `scdgm evaluate` measured (within 0.01), and far better than always
    answering the commonest type."""
    params = pbmc_project.params
    explanation = pbmc_project.path / f"{params['register']['model_dir']}-explanation" / "explanation.json"
    reported = json.loads(explanation.read_text())["label_transfer"]
    evaluated = json.loads((pbmc_project.path / "reports" / "metrics.json").read_text())["test"]["label_accuracy"]
    cells = ad.read_h5ad(pbmc_project.prepared)
    cells = cells[cells.obs["split"] == "test"]
    truth = cells.obs["cell_type"].astype(str).to_numpy()
    majority = float(np.unique(truth, return_counts=True)[1].max() / truth.size)
    port = free_port()
    log = pbmc_project.path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([*SCDGM, "serve", "--model-uri", pbmc_project.champion_uri, "--port", str(port),
                                    "--no-access-log"], cwd=pbmc_project.path, env=pbmc_project.env(),
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(HOST, port, "/ready", process)
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=120) as http:
            info = http.get("/v1/model").json()
            assert (info["name"], info["version"], info["has_explanation"]) == (params["register"]["name"], "1", True)
            body = {**sparse(cells), "cells": list(cells.obs_names)}
            embedded = http.post("/v1/embed", json=body).json()
            assert embedded["n_cells"] == cells.n_obs and embedded["missing_genes"] == []
            explained = http.post("/v1/explain", json=body).json()["explanations"]
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert [e["cell"] for e in explained] == list(cells.obs_names), log.read_text()[-2000:]
    accuracy = float((np.array([e["label"] for e in explained]) == truth).mean())
    with capsys.disabled():
        print(f"\n{pbmc_project.champion_uri} (pipeline built in {pbmc_project.seconds:.0f} s): test-split label "
              f"accuracy {accuracy:.3f}; `scdgm explain` reported {reported['accuracy']:.3f}, `scdgm evaluate` "
              f"{evaluated:.3f}; commonest type {majority:.3f}")
    assert accuracy >= reported["accuracy"] - 0.05
    assert abs(accuracy - evaluated) <= 0.01
    assert accuracy >= 2 * majority

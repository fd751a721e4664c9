"""The documentation runs as written. Every command block of README.md and docs/*.md is either executed by a test
(CLAIMED names it) or starts with a `# needs: ...` line saying what CI lacks to run it; the Python quickstart,
the serving walk-through (curl against `scdgm serve` on 127.0.0.1) and the registry commands run here; the OpenAPI
request examples are valid requests and /docs, /redoc load every asset from the app itself."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import mlflow
import pytest
import uvicorn
from docblocks import all_blocks, blocks
from repo import REPO_ROOT
from tracking_helpers import write_tiny_prepared

from scdgm.serving.loadgen import free_port, wait_until_ready

API = REPO_ROOT / "docs" / "python-api.md"
SERVING = REPO_ROOT / "docs" / "serving.md"
TRACKING = REPO_ROOT / "docs" / "tracking.md"
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMMAND_LANGUAGES = {"", "bash", "sh", "shell", "console", "python"}
"""Fenced blocks in these languages are commands or code; json/text blocks show answers."""
NEEDS = re.compile(r"^# needs: \S.{10,}")
CLAIMED = {
    ("README.md", "## Use it on your own data"): "test_install.py::test_readme_own_data_section_runs_in_a_folder_of_ones_own",
    ("docs/python-api.md", "## Quickstart"): "test_docs.py::test_python_quickstart_runs_verbatim",
    ("docs/python-api.md", "## The models and what they declare"): "test_docs.py::test_capability_example_runs",
    ("docs/serving.md", "## Starting it"): "test_docs.py::test_serving_walkthrough_runs_as_written",
    ("docs/serving.md", "## Sending cells"): "test_docs.py::test_serving_walkthrough_runs_as_written",
    ("docs/serving.md", "## The other endpoints"): "test_docs.py::test_serving_walkthrough_runs_as_written",
    ("docs/tracking.md", "## Registry"): "test_docs.py::test_serving_walkthrough_runs_as_written",
    ("docs/tracking.md", "## What a run records"): "test_docs.py::test_pyfunc_example_runs",
    ("docs/tracking.md", "## MLflow Projects and DVC"): "test_mlproject.py::test_documented_mlflow_run_tune_lands_in_the_project",
    ("docs/scale.md", "## Streaming a file larger than memory"): "test_streaming.py::test_scale_docs_run_as_written",
}
"""(file, heading) -> the test that executes the command blocks under that heading."""


def test_every_command_block_is_run_or_says_what_it_needs() -> None:
    unaccounted, stale = [], set(CLAIMED)
    for document in DOCUMENTS:
        name = str(document.relative_to(REPO_ROOT))
        for block in all_blocks(document):
            if block.language not in COMMAND_LANGUAGES:
                continue
            first = next((line for line in block.body.splitlines() if line.strip()), "")
            if NEEDS.match(first):
                continue
            stale.discard((name, block.heading))
            if (name, block.heading) not in CLAIMED:
                unaccounted.append(f"{name}:{block.line} under {block.heading!r}")
    assert not unaccounted, "blocks neither run by a test nor marked '# needs: ...': " + "; ".join(unaccounted)
    assert not stale, f"claims of headings without unmarked blocks: {sorted(stale)}"
    for test in set(CLAIMED.values()):
        module, function = test.split("::")
        assert f"def {function}(" in (REPO_ROOT / "tests" / module).read_text(), test


@pytest.mark.slow
def test_python_quickstart_runs_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    quickstart, = blocks(API, "## Quickstart", "python")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(quickstart, str(API), "exec"), namespace)  # noqa: S102 - the documentation is the test
    finally:
        os.chdir(previous)
    assert any("validation" in str(w.message) for w in caught), "the automatic split is announced"
    adata, explanation = namespace["adata"], namespace["explanation"]
    assert adata.obsm["X_scdgm"].shape == (adata.n_obs, 10)
    assert len(explanation.selected_genes) == 6 == len(adata.uns["scdgm_explanation"]["selected_genes"])
    assert namespace["labels"].shape == (100,)
    assert (tmp_path / "vae-model" / "config.json").is_file()
    assert (tmp_path / "vae-model" / "explanation" / "explanation.json").is_file()
    assert namespace["reloaded"].genes == namespace["model"].genes


def test_capability_example_runs(tmp_path: Path) -> None:
    """The declared-capability snippet runs against a fitted linear model."""
    example, = blocks(API, "## The models and what they declare", "python")
    from scdgm.models import LDVAE
    from scdgm.pipelines.simulate import simulate_programs

    model = LDVAE(n_latent=3, max_epochs=2, progress=False)
    model.fit(simulate_programs(200, 40, n_types=2, n_programs=3, genes_per_program=5, seed=0))
    exec(compile(example, str(API), "exec"), {"model": model})  # noqa: S102


# --- the app's own documentation: OpenAPI examples and offline /docs -------------------------------------------
@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app on a free loopback port, serving a small explained LDVAE trained on simulated cells."""
    import anndata as ad

    from scdgm.interpret.explain import run_explanation
    from scdgm.pipelines.train import save_model_dir, train_model
    from scdgm.serving.app import create_app
    from scdgm.serving.settings import ServeSettings

    folder = tmp_path_factory.mktemp("openapi")
    cells = ad.read_h5ad(write_tiny_prepared(folder / "cells.h5ad"))
    model, metrics = train_model("ldvae", cells, {"max_epochs": 2, "n_latent": 3, "n_hidden": 16, "progress": False,
                                                  "device": "cpu", "n_importance": 2})
    save_model_dir(model, metrics, folder / "model")
    run_explanation(model, cells, folder / "model" / "explanation", n_genes=3, permutations=5, plots=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(model_uri=str(folder / "model"), access_log=False)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until_ready("127.0.0.1", port, "/ready", timeout=60)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_openapi_examples_are_valid_requests(app_url: str) -> None:
    schema = httpx.get(f"{app_url}/openapi.json").json()
    sent = 0
    for path in ("/v1/embed", "/v1/explain"):
        examples = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        assert set(examples) == {"dense", "sparse"}
        answers = [httpx.post(f"{app_url}{path}", json=e["value"], timeout=60) for e in examples.values()]
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["n_cells"] == 2 and answer.json()["missing_genes"] == []
            sent += 1
        assert answers[0].json() == answers[1].json()  # dense and sparse: the same two cells
    assert sent == 4


class _Assets(HTMLParser):
    """Every src= and href= of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_app(app_url: str, page: str) -> None:
    html = httpx.get(f"{app_url}{page}")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    parser = _Assets()
    parser.feed(html.text)
    scripts = re.findall(r"""url:\s*['"]([^'"]+)['"]|spec-url=['"]([^'"]+)['"]""", html.text)
    urls = parser.urls + [a or b for a, b in scripts]
    assert any(u.endswith(".js") for u in urls) and any("openapi.json" in u for u in urls), urls
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from elsewhere"
        asset = httpx.get(f"{app_url}{url}")
        assert asset.status_code == 200 and asset.content, url


# --- the serving walk-through, as a user runs it ----------------------------------------------------------------
def _user_env(project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "SCDGM_PROJECT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def _bash(script: str, project: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _commands(block: str) -> list[str]:
    """The block's commands, one per line after joining `\\` continuations, without comments."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


class Servers:
    """`scdgm serve` lines of the docs started on free ports; stopped together."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project, self.env, self.running = project, env, {}

    def start(self, line: str) -> int:
        """Start a documented `scdgm serve` line (with $RUN_ID from the environment) on a free port."""
        port = free_port()
        argv = [a.replace("$RUN_ID", self.env["RUN_ID"]) for a in shlex.split(line)] + ["--port", str(port)]
        self.running[port] = subprocess.Popen(argv, cwd=self.project, env=self.env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
        return port

    def ready(self, port: int) -> dict:
        """Wait for the server on `port`, then its /v1/model answer."""
        wait_until_ready("127.0.0.1", port, "/ready", self.running[port], timeout=180)
        return httpx.get(f"http://127.0.0.1:{port}/v1/model").json()

    def stop(self) -> None:
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def served_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], Servers]]:
    """A project with small simulated cells where the pipeline keeps PBMC 3k, a tracked LDVAE and its
    explanation where the pipeline puts them, registered by the Registry commands of docs/tracking.md."""
    project = tmp_path_factory.mktemp("served")
    (project / "data" / "prepared").mkdir(parents=True)
    write_tiny_prepared(project / "data" / "prepared" / "pbmc3k.h5ad")
    env = _user_env(project)
    _bash("scdgm train --model ldvae --data data/prepared/pbmc3k.h5ad --out artifacts/pbmc3k-champion "
          "--set max_epochs=3 --set n_importance=2\n"
          "scdgm explain --model artifacts/pbmc3k-champion --data data/prepared/pbmc3k.h5ad "
          "--out artifacts/pbmc3k-champion-explanation --n-genes 3 --permutations 5\n", project, env)
    run_id = json.loads((project / "artifacts" / "pbmc3k-champion" / "mlflow_run.json").read_text())["run_id"]
    env["RUN_ID"] = run_id
    servers = Servers(project, env)
    registry, = blocks(TRACKING, "## Registry", "bash")
    *register, serve = _commands(registry)
    _bash("\n".join(register), project, env)
    try:
        assert servers.ready(servers.start(serve))["version"] == "2"
        yield project, env, servers
    finally:
        servers.stop()


@pytest.mark.slow
def test_serving_walkthrough_runs_as_written(served_project: tuple[Path, dict[str, str], Servers]) -> None:
    project, env, servers = served_project
    starting, = blocks(SERVING, "## Starting it", "bash")
    ports = [servers.start(line) for line in _commands(starting)]
    infos = [servers.ready(port) for port in ports]
    assert [(i["name"], i["version"]) for i in infos[:2]] == [("pbmc3k", "2"), ("pbmc3k", "1")]
    assert infos[2]["version"] == env["RUN_ID"] and infos[3]["name"] == "pbmc3k-champion"  # a directory: its name
    assert infos[0]["has_explanation"] and len({tuple(i["genes"]) for i in infos}) == 1
    port = ports[0]  # the champion

    def run(block: str) -> list[dict]:
        out, documents, decoder = _bash(block.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), project, env), [], \
            json.JSONDecoder()
        while out.strip():  # curl's answers follow each other without newlines
            document, end = decoder.raw_decode(out.strip())
            documents.append(document)
            out = out.strip()[end:]
        return documents

    model_info, dense, sparse, upload, python_example = (
        blocks(SERVING, "## Sending cells", "bash") + blocks(SERVING, "## Sending cells", "python"))
    assert run(model_info) == [] and json.loads((project / "model.json").read_text())["name"] == "pbmc3k"
    dense_answer, = run(dense)
    sparse_answer, = run(sparse)
    assert dense_answer["cells"] == ["cell-1", "cell-2"] and dense_answer["missing_genes"] == []
    assert dense_answer["latent_mean"] == sparse_answer["latent_mean"]
    uploaded, = run(upload)
    assert uploaded["n_cells"] == len(uploaded["explanations"]) == 400
    namespace: dict = {}
    previous = os.getcwd()
    os.chdir(project)
    try:
        exec(compile(python_example.replace(":8000", f":{port}"), str(SERVING), "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(previous)
    assert len(namespace["latents"]) == 100

    other, = blocks(SERVING, "## The other endpoints", "bash")
    answers = run(other)
    assert answers[0] == {"status": "ok"} and answers[1] == {"status": "ready", "model": "pbmc3k"}
    assert answers[2]["name"] == "pbmc3k" and len(answers[3]["explanations"]) == 2
    assert "openapi" in answers[4]
    assert all("detail" not in answer for answer in answers)


@pytest.mark.slow
def test_pyfunc_example_runs(served_project: tuple[Path, dict[str, str], Servers],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/tracking.md's pyfunc snippet on the registered champion, with counts_dataframe from the test cells."""
    import anndata as ad

    project, _, _ = served_project
    example, = blocks(TRACKING, "## What a run records", "python")
    cells = ad.read_h5ad(project / "data" / "prepared" / "pbmc3k.h5ad")[:20]
    store = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    namespace = {"counts_dataframe": cells.to_df(layer="counts" if "counts" in cells.layers else None).astype(int)}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)  # as a fresh notebook would resolve it; earlier tests set MLflow's global URI
    try:
        exec(compile(example, str(TRACKING), "exec"), namespace)  # noqa: S102
    finally:
        mlflow.set_tracking_uri(previous)
    embedding = namespace["embedding"]
    assert len(embedding) == 20 and {"latent_0", "pattern", "label"} <= set(embedding.columns)

"""`scdgm init`: a starter project for the user's own data: params.yaml (every packaged default, commented, with
the data: and register: sections pointing at the user's data), dvc.yaml (prepare → tune → train → explain →
evaluate → register), MLproject, .gitignore for scdgm's state, and git + DVC initialised when available."""
from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from scdgm.defaults import PARAMS_FILE, default_params, packaged_params_text
from scdgm.errors import ScdgmError
from scdgm.files import write_text_atomic
from scdgm.formats import CHAMPION
from scdgm.project import project_dir

TEMPLATES = ("dvc.yaml", "MLproject", "gitignore")
"""Files of scdgm/resources/project/; `gitignore` is written as `.gitignore`."""
DATA_SUFFIXES = (".gz", ".h5ad", ".h5", ".csv", ".tsv", ".txt", ".mtx")
SUBPROCESS_TIMEOUT_S = 120


@dataclass
class Starter:
    """What a new project is wired to: the dataset's name, its raw and prepared paths, the pipeline's model."""

    dataset: str
    raw: str
    prepared: str
    model: str
    model_dir: str
    registered: str
    alias: str


def dataset_name(data: Path) -> str:
    """A name for the data set from its file or folder name: `cells.h5ad` -> `cells`."""
    name = data.resolve().name
    while Path(name).suffix.lower() in DATA_SUFFIXES:
        name = name[: -len(Path(name).suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "data"


def starter_for(folder: Path, data: Path | None) -> Starter:
    """The wiring of a project in `folder`: the packaged demo's (PBMC 3k) without data, else the user's data
    (kept relative when it lies inside the project, absolute otherwise)."""
    defaults = default_params()
    register = defaults["register"]
    if data is None:
        section = defaults["data"]
        return Starter(section["dataset"], section["raw"], section["prepared"], register["model"],
                       register["model_dir"], register["name"], register["alias"])
    resolved = data.resolve()
    raw = str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(resolved)
    name = dataset_name(data)
    model = register["model"]
    registered = name if model == CHAMPION else f"{name}-{model}"  # a champion's versions may be any family
    return Starter(name, raw, f"data/prepared/{name}.h5ad", model, f"artifacts/{name}-{model}", registered,
                   register["alias"])


def _scalar(value: Any) -> str:
    """`value` as a YAML scalar: plain when that reads back the same, else JSON-quoted."""
    text = str(value)
    return text if yaml.safe_load(text) == value and ":" not in text and "#" not in text else json.dumps(value)


def params_text(starter: Starter) -> str:
    """The packaged params.yaml, comments kept, with data: and register: set to `starter`."""
    defaults = default_params()
    wanted = {
        ("data", "dataset"): starter.dataset,
        ("data", "raw"): starter.raw,
        ("data", "prepared"): starter.prepared,
        ("register", "model_dir"): starter.model_dir,
        ("register", "name"): starter.registered,
    }
    section, lines = None, []
    for line in packaged_params_text().splitlines():
        top = re.match(r"([A-Za-z_]\w*):", line)
        section = top.group(1) if top else section
        entry = re.match(r"(  ([A-Za-z_]\w*):\s*)(\S.*?)(\s+#.*)?$", line)
        if entry and (section, entry.group(2)) in wanted:
            line = entry.group(1) + _scalar(wanted[section, entry.group(2)]) + (entry.group(4) or "")
        elif section == "register":
            line = line.replace(defaults["register"]["name"], starter.registered)
        lines.append(line)
    text = "\n".join(lines) + "\n"
    written = yaml.safe_load(text)
    if any(written[section][key] != value for (section, key), value in wanted.items()):
        raise ScdgmError("internal: the packaged params.yaml no longer has the data:/register: layout init edits")
    return text


def mlproject_text(starter: Starter) -> str:
    """The MLproject template with the project's data, model and the packaged defaults filled in."""
    defaults = default_params()
    # one-step entry points take a family; the champion is the pipeline's (train --sweep), so they default to the first swept
    family = defaults["tune"]["models"][0] if starter.model == CHAMPION else starter.model
    template = string.Template(files("scdgm").joinpath("resources", "project", "MLproject").read_text())
    return template.substitute(
        name=json.dumps(starter.registered), raw=json.dumps(starter.raw), prepared=json.dumps(starter.prepared),
        model=json.dumps(family), tune_models=json.dumps(",".join(defaults["tune"]["models"])),
        model_dir=json.dumps(starter.model_dir), alias=json.dumps(starter.alias),
        max_epochs=defaults["train"]["common"]["max_epochs"], num_samples=defaults["tune"]["num_samples"],
        tune_max_epochs=defaults["tune"]["max_epochs"],
    )


def project_files(starter: Starter) -> dict[str, str]:
    """File name in the project -> text, for every file `scdgm init` writes."""
    templates = files("scdgm").joinpath("resources", "project")
    return {
        PARAMS_FILE: params_text(starter),
        "dvc.yaml": templates.joinpath("dvc.yaml").read_text(),
        "MLproject": mlproject_text(starter),
        ".gitignore": templates.joinpath("gitignore").read_text(),
    }


def _run(command: list[str], folder: Path, what: str) -> str:
    """Run a helper command in `folder`; a failure is one line naming what could not be done."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                                timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ScdgmError(f"could not {what}: {exc.__class__.__name__}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise ScdgmError(f"could not {what}: {lines[-1] if lines else f'exit code {result.returncode}'}")
    return result.stdout.strip()


def init_version_control(folder: Path) -> str:
    """`git init` (unless `folder` is already in a git work tree) and `dvc init` (unless it has .dvc/), with
    DVC's analytics off; DVC without git when git is missing. Returns what was done, for the message."""
    done = []
    git = shutil.which("git")
    dvc = [sys.executable, "-m", "dvc"]
    toplevel = None  # of the git work tree `folder` already lies in
    if git:
        probe = subprocess.run([git, "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
        toplevel = Path(probe.stdout.strip()).resolve() if probe.returncode == 0 else None
        if toplevel is None:
            _run([git, "init", "--quiet"], folder, "initialise git")
            done.append("git")
    if not (folder / ".dvc").is_dir():
        if not git:
            options = ["--no-scm"]
        elif toplevel is not None and toplevel != folder:
            options = ["--subdir"]
        else:
            options = []
        _run([*dvc, "init", "--quiet", *options], folder, "initialise DVC")
        done.append("DVC" if git else "DVC (no git found: --no-scm)")
    _run([*dvc, "config", "core.analytics", "false"], folder, "turn DVC's analytics off")
    return " and ".join(done)


def init_project(folder: Path, data: Path | None = None, force: bool = False) -> tuple[Starter, list[Path], str]:
    """Write a starter project into `folder` (created when missing); refuses to overwrite any of its files
    unless `force`. Returns (wiring, written files, version control initialised)."""
    if data is not None and not data.exists():
        raise ScdgmError(f"--data {data}: no such file or folder")
    folder = folder.expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ScdgmError(f"{folder} is a file, not a project folder")
    starter = starter_for(folder, data)
    texts = project_files(starter)
    existing = [name for name in texts if (folder / name).exists()]
    if existing and not force:
        raise ScdgmError(f"{folder} already has {', '.join(existing)}; pass --force to overwrite")
    written = [write_text_atomic(folder / name, text) for name, text in texts.items()]
    return starter, written, init_version_control(folder)


def next_steps(folder: Path, starter: Starter, data_given: bool) -> str:
    """What to run next in the new project."""
    lines = []
    if folder != Path.cwd().resolve():
        lines.append(f"  cd {folder}")
    if not data_given:
        lines.append(f"  scdgm data fetch {starter.dataset} --out {starter.raw}   # the demo data (or use --data)")
    lines += [
        f"  scdgm prepare --input {starter.raw} --out {starter.prepared}",
        f"  scdgm train --model {starter.model} --data {starter.prepared} --out {starter.model_dir}",
        f"  scdgm explain --model {starter.model_dir} --data {starter.prepared}",
        f"  scdgm tune --model {starter.model} --data {starter.prepared}",
        "  dvc repro      # or all of it as a pipeline: prepare, tune, train, explain, evaluate, register",
    ]
    return "\n".join(lines)


def init_command(
    directory: Annotated[
        Path | None, typer.Argument(help="Project folder to create or fill (default: the project, i.e. --project or .).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Your raw counts (.h5ad, 10x .h5 or folder, CSV/TSV); default: the PBMC 3k demo.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite params.yaml, dvc.yaml, MLproject and .gitignore.")] = False,
) -> None:
    """Start a project: params.yaml with every default, dvc.yaml and MLproject wired to your data, git + DVC."""
    folder = directory if directory is not None else project_dir()
    starter, written, version_control = init_project(folder, data, force)
    folder = folder.expanduser().resolve()
    names = ", ".join(path.name for path in written)
    initialised = f"; initialised {version_control}" if version_control else ""
    typer.echo(f"wrote {folder}: {names}{initialised}\nnext:\n{next_steps(folder, starter, data is not None)}")
    if data is not None:
        typer.echo("labels: set prepare.label_key in params.yaml to an obs column (else PBMC marker annotation)")

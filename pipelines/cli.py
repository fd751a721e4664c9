"""The `scdgm` command line: one Typer app; each command lives in the module named after its job.

`main` runs the app and turns every user error into a one-line message with exit code 2 (an unexpected
error gives one line and exit 1; set SCDGM_DEBUG=1 for the traceback). SIGINT and SIGTERM raise
`scdgm.errors.Terminated`, so every command cleans up on the way out (MLflow runs end KILLED, staging folders
and Ray go) and exits 130 or 143 with one line. The global `--project DIR` names the
project folder; it travels to subprocesses (Ray trials, DVC stages) as $SCDGM_PROJECT.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar

import click
import typer
import typer.core

# Spinning OpenMP threads make 2-thread torch 25-50x slower on a shared machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from scdgm.errors import ScdgmError, Terminated, raise_terminated  # noqa: E402
from scdgm.project import PROJECT_ENV, use_project  # noqa: E402

COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("scaffold", "init_command"),
    "prepare": ("prepare", "prepare_command"),
    "train": ("train", "train_command"),
    "embed": ("train", "embed_command"),
    "sample": ("train", "sample_command"),
    "explain": ("explain", "explain_command"),
    "tune": ("tune", "tune_command"),
    "evaluate": ("evaluate", "evaluate_command"),
    "register": ("registry", "register_command"),
    "report": ("report", "report_command"),
    "serve": ("serve", "serve_command"),
}
"""Command name -> (module of scdgm.pipelines, function) for `scdgm <command>`."""
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("fetch", "fetch_command"),
    "simulate": ("simulate", "simulate_command"),
}
"""The same for `scdgm data <command>`."""


def _short_help(module: str, function: str) -> str:
    """The first line of a command's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(f"scdgm.pipelines.{module}")
    tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return (ast.get_docstring(node) or "").split("\n")[0]
    return ""


class LazyCommand(typer.core.TyperCommand):
    """A command whose module is imported only when the command runs or shows its own help.

    Why: the job modules import torch, MLflow, Ray and scanpy at their top (about 6 s on 2 cores), so
    importing all of them up front would make every `scdgm` call, `scdgm --help` included, that slow.
    """

    def __init__(self, name: str, module: str, function: str) -> None:
        super().__init__(name=name, short_help=_short_help(module, function), callback=None)
        self.target = (module, function)

    def load(self) -> typer.core.TyperCommand:
        """The real Typer command, built from the job module's function."""
        module, function = self.target
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(self.name)(getattr(importlib.import_module(f"scdgm.pipelines.{module}"), function))
        return typer.main.get_command(single)

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.load().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(typer.core.TyperGroup):
    """A command group whose commands (`lazy`: name -> (module, function)) are LazyCommands."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [*self.lazy, *(name for name in super().list_commands(ctx) if name not in self.lazy)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.commands[cmd_name] = LazyCommand(cmd_name, *self.lazy[cmd_name])
        return super().get_command(ctx, cmd_name)


class ScdgmGroup(LazyGroup):
    lazy = COMMANDS


class DataGroup(LazyGroup):
    lazy = DATA_COMMANDS


app = typer.Typer(
    name="scdgm",
    cls=ScdgmGroup,
    help="Train, tune, track, explain and serve deep generative models of single-cell RNA-seq counts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    cls=DataGroup, help="Get the default dataset or simulate data with known ground truth.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@app.callback()
def project_option(
    project: Annotated[
        Path | None,
        typer.Option(
            "--project",
            help=f"Project folder (default: ${PROJECT_ENV}, else the current folder). Its params.yaml (optional) "
            "overrides the packaged defaults and every piece of state lands in it: mlflow.db, mlartifacts/, "
            "optuna.db, ray_results/, reports/. Relative paths inside params.yaml are taken from the project; "
            "paths given as command-line arguments stay relative to the current folder, as in any shell command.",
        ),
    ] = None,
) -> None:
    """Set the project for this command and the processes it starts."""
    if project is not None:
        use_project(project)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_received: list[int] = []
"""The stop signals received while `stop_on_signals` is active, so that a Terminated which a library turned into
another error (pydantic wraps what is raised while it builds a schema) still ends the command as a stop."""


def _raise_terminated(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise_terminated(signum, frame)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise `Terminated`; the previous handlers
    come back afterwards (tests call `main` in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.simplefilter("ignore", FutureWarning)
    debug = os.environ.get("SCDGM_DEBUG") == "1"
    try:
        with stop_on_signals():
            code = app(args=argv, standalone_mode=False)
    except Terminated as exc:
        if debug:
            raise
        typer.echo(f"scdgm: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Exit, click.exceptions.Exit) as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, click.exceptions.Abort):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except (typer.TyperException, click.ClickException) as exc:  # usage errors (Typer >= 0.20 vendors click's)
        message = exc.format_message()
        if "\n" in message:  # bare `scdgm` / `scdgm data`: the message is the help text itself
            exc.show()
        else:
            context = exc.ctx.command_path if isinstance(exc, typer.TyperException) and exc.ctx else "scdgm"
            typer.echo(f"error: {message} (see '{context} --help')", err=True)
        sys.exit(exc.exit_code)
    except ScdgmError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: never a traceback for the user
        if debug:
            raise
        if _received:  # a stop signal, whose Terminated a library wrapped in an error of its own
            stopped = Terminated(_received[-1])
            typer.echo(f"scdgm: {stopped}", err=True)
            sys.exit(stopped.exit_code)
        typer.echo(f"internal error: {exc.__class__.__name__}: {exc} (set SCDGM_DEBUG=1 for details)", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:  # without standalone mode Typer returns an Exit's code (Ctrl+C: 130)
        if code == 130:
            typer.echo("scdgm: stopped by SIGINT", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()

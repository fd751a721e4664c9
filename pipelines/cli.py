"""The `scdgm` command line: one Typer app; each command lives in the module named after its job.

`main` runs the app and turns every user error into a one-line message with exit code 2 (an unexpected
error gives one line and exit 1; set SCDGM_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import click
import typer

# Spinning OpenMP threads make 2-thread torch 25-50x slower on a shared machine; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from scdgm.errors import ScdgmError  # noqa: E402

app = typer.Typer(
    name="scdgm",
    help="Train, tune, track, explain and serve deep generative models of single-cell RNA-seq counts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Get the default dataset or simulate data with known ground truth.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _register() -> None:
    """Attach every command; command modules keep heavy imports inside their functions so --help is fast."""
    from scdgm.pipelines import evaluate, explain, fetch, prepare, registry, report, serve, simulate, train, tune

    data_app.command("fetch")(fetch.fetch_command)
    data_app.command("simulate")(simulate.simulate_command)
    app.command("prepare")(prepare.prepare_command)
    app.command("train")(train.train_command)
    app.command("embed")(train.embed_command)
    app.command("sample")(train.sample_command)
    app.command("explain")(explain.explain_command)
    app.command("serve")(serve.serve_command)
    app.command("tune")(tune.tune_command)
    app.command("evaluate")(evaluate.evaluate_command)
    app.command("register")(registry.register_command)
    app.command("report")(report.report_command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.simplefilter("ignore", FutureWarning)
    debug = os.environ.get("SCDGM_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ScdgmError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - last line of defence: never a traceback for the user
        if debug:
            raise
        typer.echo(f"internal error: {exc.__class__.__name__}: {exc} (set SCDGM_DEBUG=1 for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

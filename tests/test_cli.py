"""The command line's structure: every command is listed with its docstring's first line, and a command's
module (torch, MLflow, Ray...) is imported only when that command runs."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from scdgm.pipelines import cli

ALL = [(cli.ScdgmGroup, name) for name in cli.COMMANDS] + [(cli.DataGroup, name) for name in cli.DATA_COMMANDS]


@pytest.mark.parametrize(("group", "name"), ALL, ids=[name for _, name in ALL])
def test_listed_help_is_the_commands_own(group: type[cli.LazyGroup], name: str) -> None:
    listed = cli.LazyCommand(name, *group.lazy[name])
    assert listed.short_help and listed.load().help.splitlines()[0] == listed.short_help


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys\nfrom scdgm.pipelines.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'scanpy', 'scdgm.pipelines.train') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert all(name in result.stdout for name in cli.COMMANDS)


def test_signal_handlers_are_restored_after_an_in_process_run() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--resume", "--overwrite"])  # a user error: exit 2, after the handlers were installed
    assert exit_info.value.code == 2
    assert {s: signal.getsignal(s) for s in before} == before

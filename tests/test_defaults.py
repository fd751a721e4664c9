"""One source of defaults: what a library user gets (model configs, ExplainSettings, SweepSettings, prepare's
settings), the CLI's option defaults and the repository's params.yaml all equal the packaged params.yaml."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from repo import REPO_ROOT

from scdgm.defaults import default_params, default_section
from scdgm.interpret.explain import ExplainSettings
from scdgm.models import MODEL_KINDS, model_class
from scdgm.pipelines import cli, prepare
from scdgm.pipelines.sweep import SweepSettings
from scdgm.project import optuna_storage, project_path


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value (default factories called), tuples as lists as YAML has them."""
    found = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        found[field.name] = list(value) if isinstance(value, tuple) else value
    return found


def drift(library: dict[str, Any], packaged: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose library default differs from the packaged one (library, packaged), or lacks one."""
    return {key: (library.get(key, "<no default>"), value) for key, value in packaged.items()
            if library.get(key, "<no default>") != value}


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_config_defaults_are_the_packaged_train_section(kind: str) -> None:
    config = model_class(kind).Config
    names = {field.name for field in dataclasses.fields(config)}
    train = default_section("train")
    packaged = {key: value for key, value in train["common"].items() if key in names} | train[kind]
    if "seed" in names:
        packaged["seed"] = default_params()["seed"]
    assert set(packaged) <= names, f"params.yaml train.{kind} has keys {kind} lacks: {set(packaged) - names}"
    assert not drift(field_defaults(config), packaged)
    assert not drift(dataclasses.asdict(model_class(kind)().config), packaged)  # what `VAE()` really gets


def test_explain_settings_defaults_are_the_packaged_explain_section() -> None:
    packaged = default_section("explain") | {"seed": default_params()["seed"]}
    assert set(packaged) == {field.name for field in dataclasses.fields(ExplainSettings)}
    assert not drift(field_defaults(ExplainSettings), packaged)


def test_sweep_settings_defaults_are_the_packaged_tune_section() -> None:
    packaged = default_section("tune")
    packaged |= {"out": str(project_path(packaged["out"])), "storage": packaged["storage"] or optuna_storage(),
                 "seed": default_params()["seed"]}
    packaged.pop("models"), packaged.pop("name")  # required: what to tune, and a name derived from the data
    library = field_defaults(SweepSettings)
    assert library["experiment"] == default_section("tracking")["experiment"]
    assert not drift(library, packaged)


def test_prepare_defaults_are_the_packaged_prepare_section() -> None:
    assert default_section("prepare") == prepare.DEFAULTS
    assert prepare.resolve_settings({}) == default_section("prepare")


def option_defaults(group: type[cli.LazyGroup], name: str) -> dict[str, Any]:
    """The option defaults of the CLI command `name`, by parameter name."""
    command = cli.LazyCommand(name, *group.lazy[name]).load()
    return {param.name: param.default for param in command.params}


# CLI option -> params.yaml key it stands for; such an option's default must be None ("from params.yaml")
# or the packaged value.
OPTION_PARAMS = {
    "explain": {"n_genes": ("explain", "n_genes"), "draws": ("explain", "draws"),
                "permutations": ("explain", "permutations")},
    "prepare": {"n_top_genes": ("prepare", "n_top_genes"), "label_key": ("prepare", "label_key")},
    "tune": {key: ("tune", key) for key in ("num_samples", "max_concurrent", "max_epochs", "cpus_per_trial",
                                            "gpus_per_trial", "name", "storage", "out")},
    "register": {"alias": ("register", "alias")},
}


@pytest.mark.parametrize("command", OPTION_PARAMS)
def test_cli_options_default_to_params(command: str) -> None:
    defaults = option_defaults(cli.ScdgmGroup, command)
    for option, keys in OPTION_PARAMS[command].items():
        assert option in defaults, f"scdgm {command} has no option {option}"
        assert defaults[option] in (None, default_section(*keys)), f"scdgm {command} --{option}"


def test_repository_params_yaml_is_the_packaged_defaults() -> None:
    assert yaml.safe_load((REPO_ROOT / "params.yaml").read_text()) == default_params()

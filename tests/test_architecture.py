"""The house rules that keep scdgm one package with a floor: imports run one way (serving, pipelines → interpret →
models → floor), no file-level cycle, project imports at module top, no capability probes, and ruff is clean."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from repo import REPO_ROOT

# Folder in the repository -> (import name, layer). A module may import its own layer and those below it;
# pipelines (the CLI and jobs) may also start the server, serving may never reach into pipelines.
PACKAGES = {"scdgm": ("scdgm", 0), "models": ("scdgm.models", 1), "interpret": ("scdgm.interpret", 2),
            "serving": ("scdgm.serving", 3), "pipelines": ("scdgm.pipelines", 4)}
LAYER_OF = {name: layer for name, layer in PACKAGES.values()}


def module_name(path: Path) -> str:
    folder = path.relative_to(REPO_ROOT).parts
    parts = [PACKAGES[folder[0]][0], *folder[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def package_files() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in sorted((REPO_ROOT / folder).rglob("*.py"))}


MODULES = package_files()


def layer(module: str) -> int:
    """The layer of a module: its subpackage's, or the floor's for modules of scdgm itself."""
    parts = module.split(".")
    return LAYER_OF.get(".".join(parts[:2]), 0)


def resolve(target: str) -> str | None:
    """The project module an import statement loads, or None for a third-party import."""
    if target != "scdgm" and not target.startswith("scdgm."):
        return None
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def imports(tree: ast.AST, top_level_only: bool) -> list[tuple[str, ast.stmt]]:
    """(imported project module, statement) pairs; `from pkg import sub` counts the submodule when it is one."""
    found = []
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(resolve(alias.name), node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(resolve(f"{node.module}.{alias.name}") if f"{node.module}.{alias.name}" in MODULES
                       else resolve(node.module), node) for alias in node.names]
    return [(target, node) for target, node in found if target is not None]


def module_level_statements(tree: ast.Module) -> ast.Module:
    """The statements that run at import time: the module body, `if`/`try` blocks included, but not
    `if TYPE_CHECKING:` blocks (annotations only) nor function or class bodies' imports inside functions."""
    body: list[ast.stmt] = []
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try | ast.With):
            pending += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                        *[s for h in getattr(node, "handlers", []) for s in h.body]]
        body.append(node)
    return ast.Module(body=body, type_ignores=[])


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = module_level_statements(ast.parse(path.read_text()))
        edges[name] = {target for target, _ in imports(tree, top_level_only=True) if target != name}
    return edges


def test_every_import_goes_down_or_sideways() -> None:
    upward = []
    for name, path in MODULES.items():
        for target, node in imports(ast.parse(path.read_text()), top_level_only=False):
            if layer(target) > layer(name):
                upward.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {name} imports {target}")
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)


def test_serving_never_imports_pipelines() -> None:
    code = "import sys, scdgm.serving.app, scdgm.serving.service, scdgm.serving.resolve; " \
           "print(sorted(m for m in sys.modules if m.startswith('scdgm.pipelines')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert loaded.stdout.strip() == "[]"


def test_no_import_cycle_between_files() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_project_imports_sit_at_module_top() -> None:
    local = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        top = {id(node) for _, node in imports(module_level_statements(tree), top_level_only=True)}
        top |= {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for node in ast.walk(node)}
        for target, node in imports(tree, top_level_only=False):
            if id(node) not in top:
                local.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {target} inside a function")
    assert not local, "\n".join(local)


@pytest.mark.parametrize("pattern", ["import inspect", "inspect.signature", "hasattr("])
def test_no_capability_probes(pattern: str) -> None:
    """What a model can do is declared by its type (isinstance on a protocol), never found out by probing."""
    offenders = [f"{path.relative_to(REPO_ROOT)}" for path in MODULES.values() if pattern in path.read_text()]
    assert not offenders, f"{pattern!r} in " + ", ".join(offenders)


def test_floor_imports_nothing_above_it() -> None:
    for name, path in MODULES.items():
        if layer(name) == 0:
            above = [t for t, _ in imports(ast.parse(path.read_text()), top_level_only=False) if layer(t) > 0]
            assert not above, f"{name} imports {above}"


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

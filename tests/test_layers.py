"""The layers ARCHITECTURE.md draws, checked on the source: each folder imports only the layers below it,
the pure core imports nothing that runs a command, and no module imports itself through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, fleetctl

PACKAGE = ROOT / "fleetctl"
# Each layer and the layers it may import. Beside everything: records, statuses, errors, redaction, the
# systemd unit text and the files shipped to hosts (remote/); on top, the CLI, the report and the shipped
# fake of the seam (testing: RecordedConnection).
BESIDE = {"errors", "status", "records", "redact", "systemd", "remote"}
MAY_IMPORT = {
    "hosts": {"hosts"},
    "reach": {"hosts", "reach"},
    "facts": {"hosts", "reach", "facts"},
    "knowledge": {"knowledge"},
    "decide": {"hosts", "facts", "knowledge", "decide"},
    "apply": {"hosts", "reach", "facts", "knowledge", "decide", "apply"},
    "fleet": {"hosts", "reach", "facts", "knowledge", "decide", "apply", "fleet"},
}
RUNNING = {"fleetctl.reach.connection", "fleetctl.reach.fanout", "fleetctl.cli", "fleetctl.report"} | {
    f"fleetctl.{layer}.{p.stem}" for layer in ("apply", "fleet") for p in (PACKAGE / layer).glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "remote" not in p.parts and p != PACKAGE / "__init__.py"}


def imports_of(path: Path) -> set[str]:
    """The fleetctl modules *path* imports, at load or inside a function (an import put off to a function
    to dodge a circle is still a circle); annotations under TYPE_CHECKING do not count."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fleetctl"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fleetctl.")}
    return {m for m in out if m in MODULES or m.startswith("fleetctl.remote")} - {"fleetctl", module_name(path)}


def layer(module: str) -> str:
    name = module.split(".")[1]
    return "beside" if name in BESIDE else name if name in MAY_IMPORT else "top"


def test_every_module_is_in_a_layer():
    assert {layer(m) for m in MODULES} <= set(MAY_IMPORT) | {"beside", "top"}
    assert {m for m in MODULES if layer(m) == "top"} == {"fleetctl.cli", "fleetctl.report", "fleetctl.testing"}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [f"{m} imports {i}" for m, p in MODULES.items() for i in sorted(imports_of(p))
             if layer(m) in MAY_IMPORT and layer(i) not in MAY_IMPORT[layer(m)] | {"beside"}]
    wrong += [f"{m} imports {i}" for m, p in MODULES.items() for i in sorted(imports_of(p))
              if layer(m) == "beside" and layer(i) != "beside"]
    assert not wrong, wrong


def test_no_module_imports_itself_through_others():
    graph = {m: imports_of(p) for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, "import circle: " + " → ".join(path[path.index(module):] + [module])
        if module not in done:
            for dep in sorted(graph.get(module, ())):
                visit(dep, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_pure_core_loads_nothing_that_runs_commands():
    core = [m for m in MODULES if layer(m) in ("decide", "knowledge", "facts")]
    code = (f"import sys, {', '.join(core)}; "
            "print(' '.join(m for m in sys.modules if m.startswith('fleetctl.')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert {"fleetctl.decide.resolve", "fleetctl.facts.probe", "fleetctl.decide.plan"} <= loaded
    assert not loaded & RUNNING, loaded & RUNNING


def test_version():
    from fleetctl import __version__
    done = fleetctl("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fleetctl {__version__}"


def test_no_function_is_over_60_lines():
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for module, path in MODULES.items()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long

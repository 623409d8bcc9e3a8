"""The layers ARCHITECTURE.md draws, checked on the source: the pure core imports nothing that runs a
command, and no module imports itself through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, fleetctl

PACKAGE = ROOT / "fleetctl"
RUNNING = {"connection", "fanout", "execute", "images", "steps", "provision", "target", "rollout", "upgrade",
           "audit", "distribute", "cli", "report"}


def imports_of(path: Path) -> set[str]:
    """The fleetctl modules *path* imports, at load or inside a function (an import put off to a function
    to dodge a circle is still a circle); annotations under TYPE_CHECKING do not count."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return {m.split(".")[0] for m in out if (PACKAGE / f"{m.split('.')[0]}.py").exists()}


def test_no_module_imports_itself_through_others():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
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
    code = ("import sys, fleetctl.resolve, fleetctl.facts, fleetctl.plan, fleetctl.serving, fleetctl.driver, "
            "fleetctl.prerequisites; "
            "print(' '.join(m.split('.')[1] for m in sys.modules if m.startswith('fleetctl.')))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert {"resolve", "facts", "plan", "prerequisites"} <= loaded and not loaded & RUNNING, loaded & RUNNING


def test_version():
    from fleetctl import __version__
    done = fleetctl("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fleetctl {__version__}"

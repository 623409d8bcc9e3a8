"""fleetctl: provision GPU serving fleets and keep them right.

inventory → connection → facts → resolve → plan → execute → report, with the CLI on top.
"""

import importlib

__version__ = "0.1.0"  # pyproject.toml reads it from here (tool.setuptools.dynamic)

# Each public name and the module it lives in, imported on first use: `fleetctl facts` starts
# without the resolver, the templates or the rollout machinery it never calls.
_MODULES = {
    "reach.connection": "Connection LocalConnection Result connect",
    "errors": "CommandFailed FleetError HostError InventoryError MatrixError PlaybookError StateError TimedOut "
              "Unreachable WheelhouseError",
    "decide.driver": "DriverMove plan_move",
    "facts.probe": "Facts Gpu gather parse_probe",
    "reach.fanout": "Outcome fan_out",
    "hosts.inventory": "Host Inventory Selection load_inventory",
    "decide.container": "render_dockerfile render_service",
    "knowledge.matrix": "Matrix load_matrix",
    "decide.plan": "HostPlan Lock changes plan_host request_for",
    "testing": "RecordedConnection Reply",
    "decide.resolve": "Request Resolution Stack resolve",
    "decide.serving": "ServeConfig ServePlan plan_serving smoke_argv",
    "status": "Exit Status exit_code parse_verdict",
}
_HOME = {name: module for module, names in _MODULES.items() for name in names.split()}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'fleetctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value

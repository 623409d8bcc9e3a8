"""fleetctl: provision GPU serving fleets and keep them right.

inventory → connection → facts → resolve → plan → execute → report, with the CLI on top.
"""

from .connection import Connection, LocalConnection, Result, connect
from .errors import (
    CommandFailed, FleetError, HostError, InventoryError, MatrixError, PlaybookError, StateError, TimedOut, Unreachable,
    WheelhouseError,
)
from .driver import DriverMove, plan_move
from .facts import Facts, Gpu, gather, parse_probe
from .fanout import Outcome, fan_out
from .inventory import Host, Inventory, Selection, load_inventory
from .container import render_dockerfile, render_service
from .matrix import Matrix, load_matrix
from .plan import HostPlan, Lock, changes, plan_host
from .recorded import RecordedConnection, Reply
from .resolve import Request, Resolution, Stack, resolve
from .serving import ServeConfig, ServePlan, plan_serving, smoke_argv
from .status import Exit, Status, exit_code, parse_verdict

__all__ = [
    "CommandFailed", "Connection", "DriverMove", "Exit", "Facts", "FleetError", "Gpu", "Host", "HostError", "HostPlan", "Inventory",
    "InventoryError", "LocalConnection", "Lock", "Matrix", "MatrixError", "Outcome", "PlaybookError",
    "RecordedConnection", "Reply", "Request", "Resolution", "Result", "Selection", "ServeConfig", "ServePlan", "Stack", "StateError",
    "Status", "TimedOut", "Unreachable",
    "WheelhouseError", "changes", "connect", "exit_code", "fan_out", "gather", "load_inventory", "load_matrix",
    "parse_probe", "parse_verdict", "plan_host", "plan_move", "plan_serving", "render_dockerfile", "render_service", "resolve", "smoke_argv",
]

"""fleetctl: provision GPU serving fleets and keep them right.

inventory → connection → facts → resolve → plan → execute → report, with the CLI on top.
"""

from .connection import Connection, LocalConnection, Result, connect
from .errors import CommandFailed, FleetError, HostError, InventoryError, TimedOut, Unreachable
from .facts import Facts, Gpu, gather, parse_probe
from .fanout import Outcome, exit_code, fan_out
from .inventory import Host, Inventory, load_inventory

__all__ = [
    "CommandFailed", "Connection", "Facts", "FleetError", "Gpu", "Host", "HostError", "Inventory",
    "InventoryError", "LocalConnection", "Outcome", "Result", "TimedOut", "Unreachable", "connect",
    "exit_code", "fan_out", "gather", "load_inventory", "parse_probe",
]

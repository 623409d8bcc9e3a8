"""Slices on a Ray cluster: one command's N ``--slice I/N`` runs as Ray tasks, merged into the
result a single controller would have printed (:mod:`fleetctl.fleet.merge`).

A slice is the unchanged CLI, ``python -m fleetctl.cli KIND INVENTORY… --slice I/N --json``, run
by a Ray task as a child process of its worker. The child dies with the worker (Linux's
parent-death signal, set between fork and exec), so a worker or node that dies leaves no
controller behind still talking to hosts. What Ray does with such a task is its own retry:
``max_retries`` re-runs a slice whose worker or node died, and a child killed by a signal
counts the same way. A slice that ran and exited (0, 2, 4, 6: its JSON is its result) is never
re-run: a retry would hide a real failure, or apply a provision twice.

Placement comes from :func:`fleetctl.fleet.slicing.placements`: a slice whose hosts are all in one
region asks for a sliver of the custom resource ``fleet_region:<region>``, which a node offers when
started with ``ray start --resources '{"fleet_region:<region>": 1}'``. A region no node of the
cluster offers, or a slice serving several regions (or none), runs on any node, and
:class:`Placement` says so: Ray would otherwise hold an infeasible task forever. A region whose
nodes all die mid-run has its slice re-submitted anywhere, for the same reason.

The slices read the inventory, its key and the lock at the paths the caller gives (absolute, the
CLI makes them so): on a real cluster they must be at the same path on every node, and fleetctl
installed beside the workers' Python, as on every node of an Ansible pull fleet.

Ray is optional (``pip install 'fleetctl[ray]'``) and imported only inside the functions here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from fleetctl.errors import FleetError
from fleetctl.fleet.merge import merge
from fleetctl.fleet.slicing import Slice, placements
from fleetctl.hosts.inventory import Host

RESOURCE = "fleet_region:{}"
SLIVER = 0.001  # of a node's fleet_region resource: any number of slices fit, CPUs bound them
TAIL = 4000  # characters of a slice's stderr brought back
PR_SET_PDEATHSIG = 1
POLL = 2.0  # seconds between looks at the cluster while slices run


@dataclass(frozen=True)
class Placement:
    """Where slice *spec* runs: on a node offering *resource*, or anywhere (None); *note* says why."""

    spec: Slice
    regions: tuple[str, ...]
    resource: str | None
    note: str


@dataclass(frozen=True)
class SliceRun:
    """One slice's run as its task returned it: the CLI's exit status, its stdout, its stderr's tail,
    and the Ray node it ran on."""

    spec: Slice
    exit: int
    stdout: str
    stderr: str
    node: str


@dataclass(frozen=True)
class Distributed:
    """The merged result (what one controller's ``--json`` prints), and how each slice got it."""

    merged: dict
    placements: tuple[Placement, ...]
    runs: tuple[SliceRun, ...]


class SliceKilled(Exception):
    """The slice's controller died by a signal before it printed a result; Ray re-runs the task."""


def place(spec: Slice, regions: tuple[str, ...], offered: Mapping[str, float]) -> Placement:
    """Where to run slice *spec*, whose hosts are in *regions*, on a cluster offering *offered*
    (``ray.cluster_resources()``). Pure."""
    if len(regions) != 1:
        why = f"its hosts are in {len(regions)} regions" if regions else "its hosts have no fleet_region"
        return Placement(spec, regions, None, f"slice {spec}: {why}; it runs on any node")
    resource = RESOURCE.format(regions[0])
    if offered.get(resource, 0) <= 0:
        return Placement(spec, regions, None, f"slice {spec} ({regions[0]}): no node of the cluster offers "
                                              f"{resource}; it runs on any node")
    return Placement(spec, regions, resource, f"slice {spec} ({regions[0]}): on a node offering {resource}")


def plan(hosts: Iterable[Host], count: int, offered: Mapping[str, float]) -> list[Placement]:
    """Each of the *count* slices' placement, from the hosts' regions and what the cluster offers."""
    regions = placements(hosts, count)
    return [place(Slice(i, count), regions[i], offered) for i in range(1, count + 1)]


# The slice protocol: the options of each command a slice repeats (the rest are the controller's own), and
# which of them are paths (made absolute: a slice's worker may run elsewhere).
FORWARDED = {
    "facts": (),
    "plan": ("cuda", "vllm", "mode", "cuda_compat", "driver", "matrix", "write_lock"),
    "audit": ("lock", "validate", "since"),
    "provision": ("playbook", "check", "revalidate", "wheelhouse", "cuda", "vllm"),
}
PATHS = {"matrix", "write_lock", "lock", "playbook", "wheelhouse"}


def command_words(command: str, inventories: list[str], forks: int, timeout: float, limit: str | None,
                  options: Mapping[str, object], *, inventory: str) -> list[str]:
    """The arguments after ``fleetctl`` of every slice of *command* (without its --slice): the inventories
    and paths absolute, each forwarded option of *options* (dest → value) as its flag."""
    from fleetctl.decide.plan import Lock

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() or "," not in path else path

    words = [command, *map(absolute, inventories), "--forks", str(forks), "--timeout", str(timeout)]
    if limit:
        words += ["--limit", limit]
    for dest, value in options.items():
        option = "--" + dest.replace("_", "-")
        if dest == "write_lock" and value == "":
            value = str(Lock.beside(inventory))
        if value is True:
            words.append(option)
        elif value not in (None, False):
            words += [option, absolute(str(value)) if dest in PATHS else str(value)]
    return words


def slice_argv(argv: list[str], spec: Slice) -> list[str]:
    """The CLI arguments of slice *spec* of the command *argv* (no --slice, no output options)."""
    return [*argv, "--slice", str(spec), "--json"]


def run(kind: str, argv: list[str], hosts: list[Host], count: int, *, order: Iterable[str],
        address: str | None = None, retries: int = 2,
        on_placed: Callable[[Placement], None] | None = None) -> Distributed:
    """Run ``fleetctl KIND`` (*argv*, the arguments after ``fleetctl``, with absolute paths) as
    *count* slices of *hosts* on the Ray cluster at *address*, and merge them in *order*.

    A slice that exited without a result (fleetctl's own error, exit 1) or whose worker died more
    than *retries* times is a FleetError naming it: the merge never leaves a slice's hosts out."""
    ray = _ray()
    # Ray's driver prints what the cluster reports (a worker that died, say) on stdout, which is the
    # merged result's: while connected, its prints go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        _connect(ray, address)
        try:
            placed = plan(hosts, count, ray.cluster_resources())
            for p in placed:
                if on_placed:
                    on_placed(p)
            runs = _run_all(ray, placed, argv, retries, on_placed)
        finally:
            ray.shutdown()  # the connection only: a cluster this run did not start keeps running
    documents = [_document(kind, r) for r in runs]
    return Distributed(merge(kind, documents, order), tuple(placed), tuple(runs))


def run_slice(argv: list[str]) -> tuple[int, str, str, str]:
    """The Ray task: slice *argv* of the CLI as a child of this worker, which it does not outlive.
    (exit status, stdout, stderr's tail, this node's id); SliceKilled where a signal ended it."""
    import ray

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    worker = os.getpid()

    def die_with_worker() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != worker:  # the worker died before the signal was armed
            os._exit(128 + signal.SIGKILL)

    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, preexec_fn=die_with_worker)
    if done.returncode < 0:
        raise SliceKilled(f"the slice's controller was killed by signal {-done.returncode}: "
                          f"{done.stderr[-TAIL:].strip()}")
    return done.returncode, done.stdout, done.stderr[-TAIL:], ray.get_runtime_context().get_node_id()


def _ray():
    try:
        import ray
    except ImportError:
        raise FleetError("--engine ray needs Ray, which is not installed",
                         fix="pip install 'fleetctl[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> None:
    """Join the cluster at *address* (else RAY_ADDRESS, a cluster running on this machine, or a new
    local one, as ``ray.init`` decides), quietly: stdout is the merged result's."""
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:  # ray.init would retry a dead address for minutes
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise FleetError(f"no Ray cluster answers at {address}: {exc.strerror or exc}",
                             fix="start one with `ray start --head --port PORT`, or name its head with --ray-address") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FleetError(f"cannot join the Ray cluster at {address or 'auto'}: {str(exc).splitlines()[0]}",
                         fix="start one with `ray start --head`, or name it with --ray-address HOST:PORT") from None


def _submit(task, p: Placement, argv: list[str], retries: int):
    task = task.options(
        num_cpus=1, resources={p.resource: SLIVER} if p.resource else {}, max_retries=retries,
        retry_exceptions=[SliceKilled], name=f"fleetctl slice {p.spec}")
    return task.remote(slice_argv(argv, p.spec))


def _run_all(ray, placed: list[Placement], argv: list[str], retries: int,
             on_placed: Callable[[Placement], None] | None) -> list[SliceRun]:
    """Every slice's run, in slice order. A slice held for a region whose nodes have all gone is
    cancelled and submitted again to run anywhere, rather than waiting for ever."""
    task = ray.remote(run_slice)
    pending = {_submit(task, p, argv, retries): p for p in placed}
    runs: dict[Slice, SliceRun] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL)
            for ref in ready:
                p = pending.pop(ref)
                runs[p.spec] = _result(ray, p, ref, retries)
            if not ready:
                offered = ray.cluster_resources()
                for ref, p in list(pending.items()):
                    if p.resource and offered.get(p.resource, 0) <= 0:
                        ray.cancel(ref)
                        del pending[ref]
                        moved = Placement(p.spec, p.regions, None, f"slice {p.spec} ({p.regions[0]}): no node "
                                                                   f"offers {p.resource} any more; it runs on any node")
                        if on_placed:
                            on_placed(moved)
                        pending[_submit(task, moved, argv, retries)] = moved
    except BaseException:
        for ref in pending:  # an interrupted run leaves no slice running: its worker, and so its child, is killed
            ray.cancel(ref, force=True)
        raise
    return [runs[p.spec] for p in placed]


def _result(ray, p: Placement, ref, retries: int) -> SliceRun:
    try:
        exit_status, stdout, stderr, node = ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        why = f"{type(cause).__name__}: {cause}" if cause is not None else type(exc).__name__
        raise FleetError(f"slice {p.spec} did not finish on the cluster ({why.splitlines()[0]})",
                         fix=f"its worker died {retries + 1} times, or it could not start: see `ray logs`") from None
    return SliceRun(p.spec, exit_status, stdout, stderr, node)


def _document(kind: str, r: SliceRun) -> dict:
    """A slice's --json, or a FleetError with its stderr's last line where it printed none."""
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("slice") != str(r.spec):
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FleetError(f"slice {r.spec} exited {r.exit} without a {kind} result: {last}")
    return doc

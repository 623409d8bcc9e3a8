"""Merging the ``--json`` outputs of ``--slice I/N`` runs into one fleet-wide result (pure).

``merge(kind, documents, order)`` takes the slices' parsed JSON (facts, plan, audit or provision)
and returns the document one controller would have printed: every host once, in *order* (the
inventory's) where given, else sorted by name. A host in two slices, slices that ran with
different options, a slice given twice or one missing is a :class:`~fleetctl.errors.FleetError`
naming it: a merged result must never quietly count a host twice or leave one out.
``exit_status`` is the code the single run would have exited with.
"""

from __future__ import annotations

from typing import Iterable

from fleetctl.errors import FleetError
from fleetctl.status import exit_code

KINDS = ("facts", "plan", "audit", "provision")
# Provision record keys that differ from slice to slice and are merged, not compared.
_PER_SLICE = {"run_id", "started", "finished", "hosts", "slice"}


def merge(kind: str, documents: list[dict], order: Iterable[str] | None = None) -> dict:
    """One *kind* result from the slices' *documents* (each a parsed ``--json`` output)."""
    if kind not in KINDS:
        raise FleetError(f"cannot merge {kind!r}", fix=f"one of {', '.join(KINDS)}")
    if not documents:
        raise FleetError("nothing to merge", fix="name the slices' --json files")
    for i, doc in enumerate(documents, 1):
        if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), dict):
            raise FleetError(f"input {i} is not a {kind} --json output (no 'hosts' mapping)")
    _check_slices(documents)
    hosts = _merged_hosts(documents, order)
    if kind in ("facts", "plan"):
        return {"hosts": hosts}
    if kind == "audit":
        return _audit(documents, hosts)
    return _provision(documents, hosts)


def exit_status(kind: str, merged: dict) -> int:
    """The exit code a single run of *kind* over the merged hosts would return."""
    statuses = (h.get("status") for h in merged["hosts"].values())
    return exit_code(statuses, combine=kind == "audit")


def _check_slices(documents: list[dict]) -> None:
    """Where the slices say which they are (``"slice": "I/N"``), all N must be there, each once."""
    specs = [doc.get("slice") for doc in documents]
    if not any(specs):
        return
    if not all(specs):
        raise FleetError("some inputs are slices and some are not", fix="merge the --json of one --slice I/N set")
    counts = {str(s).partition("/")[2] for s in specs}
    if len(counts) != 1:
        raise FleetError(f"the inputs come from different slicings ({', '.join(sorted(map(str, specs)))})",
                         fix="merge the N outputs of one --slice I/N set")
    n = int(counts.pop())
    seen = [int(str(s).partition("/")[0]) for s in specs]
    twice = sorted({i for i in seen if seen.count(i) > 1})
    if twice:
        raise FleetError(f"slice {twice[0]}/{n} is given twice", fix="name each slice's output once")
    missing = sorted(set(range(1, n + 1)) - set(seen))
    if missing:
        raise FleetError(f"slice {', '.join(f'{i}/{n}' for i in missing)} missing: the merged result would "
                         "leave its hosts out", fix="run it (or re-run its worker) and merge again")


def _merged_hosts(documents: list[dict], order: Iterable[str] | None) -> dict[str, dict]:
    found: dict[str, dict] = {}
    where: dict[str, int] = {}
    for i, doc in enumerate(documents, 1):
        for name, result in doc["hosts"].items():
            if name in found:
                raise FleetError(f"host {name} is in two slices (inputs {where[name]} and {i})",
                                 fix="merge the outputs of one --slice I/N set, each once")
            found[name], where[name] = result, i
    rank = {name: i for i, name in enumerate(order or ())}
    return {name: found[name] for name in sorted(found, key=lambda n: (n not in rank, rank.get(n, 0), n))}


def _audit(documents: list[dict], hosts: dict) -> dict:
    """An audit report: the run ids joined (each slice kept its own snapshot under its id), the
    earliest time, and --since changes merged where every slice compared with the same audit."""
    first = min(documents, key=lambda d: d.get("timestamp", 0))
    merged = {"run_id": "+".join(d.get("run_id", "?") for d in documents), "time": first.get("time"),
              "timestamp": first.get("timestamp"), "hosts": hosts}
    since = [d.get("since") for d in documents]
    if any(since):
        ids = {s["run_id"] for s in since if s}
        if not all(since) or len(ids) != 1:
            raise FleetError("the slices' audits ran with different --since", fix="run every slice with the same one")
        changes = {k: v for s in since for k, v in s.get("changes", {}).items()}
        merged["since"] = {"run_id": ids.pop(), "changes": {n: changes[n] for n in hosts if n in changes}}
    return merged


def _provision(documents: list[dict], hosts: dict) -> dict:
    """A provision record: what was asked (the same in every slice), the first start, the last finish."""
    asked = [{k: v for k, v in d.items() if k not in _PER_SLICE} for d in documents]
    for a in asked[1:]:
        if a != asked[0]:
            differ = sorted(k for k in set(a) | set(asked[0]) if a.get(k) != asked[0].get(k))
            raise FleetError(f"the slices' provision runs were asked different things ({', '.join(differ)})",
                             fix="merge the outputs of one --slice I/N set")
    return {"run_id": "+".join(d.get("run_id", "?") for d in documents), **asked[0],
            "started": min(d.get("started", "") for d in documents), "hosts": hosts,
            "finished": max(d.get("finished", "") for d in documents)}

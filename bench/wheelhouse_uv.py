"""Benchmark: `fleetctl wheelhouse` for one host class resolved by uv and by pip, side by side in one run.

    .venv/bin/python bench/wheelhouse_uv.py [--out DIR] [--inventory INV] [--playbook PB] [--facts FACTS]
                                            [--only uv,pip] [--cold]

Defaults: the GPU test host's class (inventories/gpu-test-host.yml, playbooks/gpu-serve.yml,
tests/gpu/gpu-test-host.facts.json) into DIR/uv and DIR/pip (DIR: /tmp/fleetctl-bench-wheelhouse), each
emptied first, so both download every wheel. Both share the controller's pip download cache (pip fetches
the wheels for either resolver): run once to warm it, or pass --cold to give each build an empty cache
of its own (PIP_CACHE_DIR, UV_CACHE_DIR) so both really download. uv runs first and pip second, as pip's
resolution, the slow half, needs no warm-up. For each resolver the table gives the wall time, the time
in resolution (uv pip compile / pip install --dry-run, all passes) and in download (pip download
--no-deps), the resolution passes, the files and their size, and the host conflicts named; then whether
both chose the same wheels. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetctl.apply import wheelhouse  # noqa: E402
from fleetctl.hosts.inventory import load_inventory  # noqa: E402
from fleetctl.hosts.playbook import load_playbook  # noqa: E402
from fleetctl.knowledge.matrix import load_matrix  # noqa: E402


def plans(inventory: str, playbook: str, facts_file: str) -> list[wheelhouse.ClassPlan]:
    inv = load_inventory([inventory])
    _, plays = load_playbook(playbook)
    names = [h.name for h in inv.select("all")]
    facts, problems = wheelhouse.facts_from_json(facts_file, names)
    inputs, refused = wheelhouse.host_inputs(plays, inv, names, facts, load_matrix())
    if problems or refused:
        raise SystemExit("; ".join([*problems.values(), *refused.values()]))
    return wheelhouse.plan_classes(inputs)


def timed(calls: list, kind_of, run):
    """A runner that records (kind, seconds) for every call it passes on."""
    def wrapped(*args):
        start = time.monotonic()
        try:
            return run(*args)
        finally:
            calls.append((kind_of(args[0]), time.monotonic() - start))
    return wrapped


def one(resolver: str, class_plans, dest: Path, cold: bool) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    calls: list = []
    saved = {k: os.environ.get(k) for k in ("PIP_CACHE_DIR", "UV_CACHE_DIR")}
    cache = tempfile.mkdtemp(prefix=f"fleetctl-bench-cache-{resolver}-") if cold else None
    if cache:
        os.environ.update(PIP_CACHE_DIR=f"{cache}/pip", UV_CACHE_DIR=f"{cache}/uv")
    try:
        python = wheelhouse.controller_python(class_plans[0].platform.python)
        kind = lambda args: "resolve" if args[0] == "install" else "download"  # noqa: E731
        pip = timed(calls, kind, wheelhouse.pip_runner(python))
        uv = None
        if resolver == "uv":
            uv = timed(calls, lambda args: "resolve", wheelhouse.uv_runner(wheelhouse.find_uv()))
        start = time.monotonic()
        results = wheelhouse.build(class_plans, dest, runner=pip, uv=uv, resolver=resolver)
        wall = time.monotonic() - start
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    files = [f for r in results if r.ok for f in r.entry["files"]]
    return {"resolver": resolver, "wall_s": round(wall, 1),
            "resolve_s": round(sum(s for k, s in calls if k == "resolve"), 1),
            "resolve_passes": sum(1 for k, _ in calls if k == "resolve"),
            "download_s": round(sum(s for k, s in calls if k == "download"), 1),
            "files": len(files), "mib": round(sum(f["size"] for f in files) / 2 ** 20, 1),
            "wheels": sorted(f["name"] for f in files),
            "host_conflicts": [c for r in results if r.ok for c in r.entry["host_conflicts"]],
            "errors": [r.error for r in results if not r.ok]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/fleetctl-bench-wheelhouse")
    ap.add_argument("--inventory", default="inventories/gpu-test-host.yml")
    ap.add_argument("--playbook", default="playbooks/gpu-serve.yml")
    ap.add_argument("--facts", default="tests/gpu/gpu-test-host.facts.json")
    ap.add_argument("--only", default="uv,pip")
    ap.add_argument("--cold", action="store_true", help="an empty download cache for each build")
    args = ap.parse_args()
    class_plans = plans(args.inventory, args.playbook, args.facts)
    rows = [one(r, class_plans, Path(args.out) / r, args.cold) for r in args.only.split(",")]
    print(f"classes: {', '.join(p.name for p in class_plans)}; cache: {'cold' if args.cold else 'shared'}")
    print(f"{'resolver':<9}{'wall s':>8}{'resolve s':>11}{'passes':>8}{'download s':>12}{'files':>7}{'MiB':>8}"
          f"{'conflicts':>11}")
    for r in rows:
        print(f"{r['resolver']:<9}{r['wall_s']:>8}{r['resolve_s']:>11}{r['resolve_passes']:>8}{r['download_s']:>12}"
              f"{r['files']:>7}{r['mib']:>8}{len(r['host_conflicts']):>11}")
        for e in r["errors"]:
            print(f"  {r['resolver']} failed: {e}")
    if len(rows) == 2:
        a, b = (set(r["wheels"]) for r in rows)
        print(f"same wheels: {a == b}" + ("" if a == b else f" (only {rows[0]['resolver']}: {sorted(a - b)}; "
                                                          f"only {rows[1]['resolver']}: {sorted(b - a)})"))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "wheels"} for r in rows]}))


if __name__ == "__main__":
    main()

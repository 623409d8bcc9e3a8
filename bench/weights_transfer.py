"""Bytes over the controller's link: fleetctl's transfer plan (one copy per region, the rest host to host)
against a naive push of one copy per host, for 3 and for 50 simulated hosts, side by side.

    .venv/bin/python bench/weights_transfer.py

The hosts are simulated (the plan is pure: names and regions in, rounds out); the times are the plan's
rounds under a stated link model, not a measurement: the controller's uplink sends one copy at a time at
CONTROLLER_GBPS, a host's link is shared by the copies it sends at once (HOST_GBPS / per_source).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetctl.decide.transfer import CONTROLLER, TransferPlan, plan_transfer  # noqa: E402

CONTROLLER_GBPS = 10.0
HOST_GBPS = 25.0
PER_SOURCE = 2
MODELS = {"Llama-3.1-8B bf16": 16.1e9, "Llama-3.1-70B bf16": 141.1e9}  # about: their safetensors files, in bytes
FLEETS = {"3 hosts, 2 regions": (3, 2), "50 hosts, 5 regions": (50, 5)}


def seconds(plan: TransferPlan) -> float:
    """The plan's time under the link model: each round lasts as long as its slowest copy."""
    total = 0.0
    for copies in plan.rounds:
        sends = {c.source: sum(d.source == c.source for d in copies) for c in copies}
        total += max(plan.size * 8 / 1e9 / (CONTROLLER_GBPS if c.source == CONTROLLER else HOST_GBPS / sends[c.source])
                     for c in copies)
    return total


def main() -> None:
    print(f"link model: controller uplink {CONTROLLER_GBPS:g} Gb/s (one copy at a time), host links {HOST_GBPS:g} Gb/s "
          f"shared by up to {PER_SOURCE} copies at once\n")
    print(f"{'model':20} {'fleet':22} {'controller GB':>14} {'naive GB':>10} {'saved':>7} {'rounds':>7} "
          f"{'plan min':>9} {'naive min':>10}")
    for model, size in MODELS.items():
        for fleet, (hosts, regions) in FLEETS.items():
            plan = plan_transfer({f"h{i:03d}": f"region-{i % regions}" for i in range(hosts)}, (), int(size),
                                 per_source=PER_SOURCE)
            naive_s = plan.naive_bytes * 8 / 1e9 / CONTROLLER_GBPS
            print(f"{model:20} {fleet:22} {plan.controller_bytes / 1e9:14.1f} {plan.naive_bytes / 1e9:10.1f} "
                  f"{1 - plan.controller_bytes / plan.naive_bytes:7.0%} {len(plan.rounds):7d} "
                  f"{seconds(plan) / 60:9.1f} {naive_s / 60:10.1f}")


if __name__ == "__main__":
    main()

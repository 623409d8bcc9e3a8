"""Who copies a model's weights to whom (pure: hosts, regions and holders in, rounds of copies out).

The controller's uplink is the scarce link: a hundred hosts pulling 140 GB each through it is 14 TB. So
the controller sends one copy into each region that has none, and from then on hosts that hold a verified
copy serve the others of their region, each to at most ``per_source`` hosts at once, each copy at most
``fleet_model_bandwidth`` (a cap per link, :func:`parse_rate`); copies never cross regions
(``fleet_region`` in the inventory; hosts without one share a region).
Each round the copies of the round before have landed, so a region of *n* hosts fills in about
1 + log2(n) rounds while the controller sends once per region.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

CONTROLLER = "controller"
DEFAULT_REGION = "default"


@dataclass(frozen=True)
class Copy:
    source: str  # CONTROLLER or the host that holds a verified copy
    dest: str
    region: str


@dataclass(frozen=True)
class TransferPlan:
    """The copies, round by round, of a model of *size* bytes."""

    rounds: tuple[tuple[Copy, ...], ...]
    size: int
    hosts: int  # hosts that lacked the model when planned

    @property
    def controller_copies(self) -> int:
        return sum(c.source == CONTROLLER for r in self.rounds for c in r)

    @property
    def controller_bytes(self) -> int:
        """Bytes through the controller's link."""
        return self.size * self.controller_copies

    @property
    def naive_bytes(self) -> int:
        """Bytes through the controller's link were it to push every host its own copy."""
        return self.size * self.hosts

    def to_dict(self) -> dict:
        return {"size": self.size, "hosts": self.hosts, "controller_bytes": self.controller_bytes,
                "naive_bytes": self.naive_bytes,
                "rounds": [[{"from": c.source, "to": c.dest, "region": c.region} for c in r] for r in self.rounds]}


RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kMGT]?)(B|bit)/s")
SI = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_rate(value) -> float | None:
    """``fleet_model_bandwidth`` in bytes a second: "200MB/s", "1.5Gbit/s" (SI prefixes); unset: no cap. A
    value in another form raises ValueError saying the forms it takes."""
    if value is None or value == "":
        return None
    found = RATE.fullmatch(str(value).strip())
    if not found or float(found[1]) <= 0:
        raise ValueError(f"fleet_model_bandwidth is {str(value)[:40]!r}: write a rate per copy such as 200MB/s or "
                         "800Mbit/s")
    return float(found[1]) * SI[found[2]] / (8 if found[3] == "bit" else 1)


def region_of(hostvars: Mapping) -> str:
    return str(hostvars.get("fleet_region") or DEFAULT_REGION)


def plan_transfer(regions: Mapping[str, str], holders: Iterable[str], size: int, *, per_source: int = 1,
                  controller_links: int = 1) -> TransferPlan:
    """The rounds that bring the model to every host of *regions* (host → region) that is not in *holders*:
    each round the controller sends to at most *controller_links* regions that hold no copy, and each
    holder to at most *per_source* hosts of its own region."""
    if per_source < 1 or controller_links < 1:
        raise ValueError("per_source and controller_links are 1 or more")
    held = {h for h in holders if h in regions}
    lacking = sorted(h for h in regions if h not in held)
    rounds: list[tuple[Copy, ...]] = []
    todo = set(lacking)
    while todo:
        copies: list[Copy] = []
        by_region = _group(regions, todo)
        sources = _group(regions, held)
        for region in sorted(r for r in by_region if r not in sources)[:controller_links]:
            dest = by_region[region].pop(0)
            copies.append(Copy(CONTROLLER, dest, region))
        for region, hosts in sorted(sources.items()):
            waiting = by_region.get(region, [])
            for source in hosts:
                for _ in range(per_source):
                    if waiting:
                        copies.append(Copy(source, waiting.pop(0), region))
        rounds.append(tuple(copies))
        landed = {c.dest for c in copies}
        held |= landed
        todo -= landed
    return TransferPlan(tuple(rounds), size, len(lacking))


def _group(regions: Mapping[str, str], hosts: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for host in sorted(hosts):
        out.setdefault(regions[host], []).append(host)
    return out

"""Slices: which share of the selected hosts ``--slice I/N`` gives one controller (pure).

Each host lands in exactly one of slices 1..N, decided from host names and placement vars alone,
never from inventory order, so every controller computes the same split on any machine:

- A host with a placement var (``fleet_region``, else ``fleet_datacenter``) belongs to its region.
  Regions get slices in proportion to their host counts (largest remainder, each region at least
  one, ties by name), as contiguous blocks in region-name order, so a slice serves one region and
  its worker can run next to those hosts. With more regions than slices, whole regions are packed
  instead, largest first onto the slice with fewest hosts, so no region is split.
- Within the slices its region owns (all N for a host with no placement var), a host goes to the
  slice with the highest SHA-256 of ``name/slice`` (rendezvous hashing): adding or removing a host
  moves no other host while the regions' share of slices stays the same, and a region that gains
  a slice takes hosts only into that new slice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from fleetctl.hosts.inventory import Host

PLACEMENT = ("fleet_region", "fleet_datacenter")


@dataclass(frozen=True)
class Slice:
    """Slice *index* of *count* (both from 1), as ``--slice I/N`` names it."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> Slice:
        """``I/N`` with 1 ≤ I ≤ N; ValueError saying what is wrong otherwise."""
        index, sep, count = text.strip().partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{text!r}: I/N, slice I of N (e.g. 2/4)")
        spec = cls(int(index), int(count))
        if not 1 <= spec.index <= spec.count:
            raise ValueError(f"{text!r}: I from 1 to N (slice {spec.index} of {spec.count} does not exist)")
        return spec


def placement(host: Host) -> str | None:
    """The region (or datacenter) a host is placed in, or None."""
    for var in PLACEMENT:
        value = host.vars.get(var)
        if value not in (None, ""):
            return str(value)
    return None


def assign(hosts: Iterable[Host], count: int) -> dict[str, int]:
    """Each host's slice (1..*count*), by name; the same for any order of *hosts*."""
    hosts = list(hosts)
    owners = region_slices(Counter(p for h in hosts if (p := placement(h)) is not None), count)
    everywhere = tuple(range(1, count + 1))
    return {h.name: _rendezvous(h.name, owners.get(placement(h), everywhere)) for h in hosts}


def take(hosts: Iterable[Host], spec: Slice) -> list[Host]:
    """The hosts of slice *spec*, in the order given."""
    hosts = list(hosts)
    where = assign(hosts, spec.count)
    return [h for h in hosts if where[h.name] == spec.index]


def placements(hosts: Iterable[Host], count: int) -> dict[int, tuple[str, ...]]:
    """Each slice's regions (sorted; empty where its hosts have no placement var): where an engine
    should run the slice's worker."""
    hosts = list(hosts)
    where = assign(hosts, count)
    found: dict[int, set[str]] = {i: set() for i in range(1, count + 1)}
    for h in hosts:
        if (p := placement(h)) is not None:
            found[where[h.name]].add(p)
    return {i: tuple(sorted(regions)) for i, regions in found.items()}


def region_slices(sizes: Counter, count: int) -> dict[str, tuple[int, ...]]:
    """The slices each region owns, from the regions' host counts alone."""
    regions = sorted(sizes)
    if not regions:
        return {}
    if len(regions) > count:
        load = [0] * count
        owners = {}
        for region in sorted(regions, key=lambda r: (-sizes[r], r)):
            lightest = min(range(count), key=lambda i: (load[i], i))
            load[lightest] += sizes[region]
            owners[region] = (lightest + 1,)
        return owners
    total = sum(sizes.values())
    share = {r: 1 + (count - len(regions)) * sizes[r] / total for r in regions}  # one each, the rest by size
    got = {r: int(share[r]) for r in regions}
    for r in sorted(regions, key=lambda r: (-(share[r] - got[r]), r))[:count - sum(got.values())]:
        got[r] += 1
    owners, start = {}, 1
    for r in regions:
        owners[r] = tuple(range(start, start + got[r]))
        start += got[r]
    return owners


def _rendezvous(name: str, slices: tuple[int, ...]) -> int:
    return max(slices, key=lambda s: hashlib.sha256(f"{name}/{s}".encode()).digest())

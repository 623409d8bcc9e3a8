"""--slice I/N's rule, as data: every host in exactly one slice, whatever the order, regions kept together."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fleetctl import cli
from fleetctl.fleet.slicing import Slice, assign, placements, region_slices, take
from fleetctl.hosts.inventory import Host


def hosts(n: int, prefix: str = "gpu", **placement) -> list[Host]:
    return [Host(f"{prefix}-{i:03d}", dict(placement)) for i in range(n)]


FLEETS = {
    "no placement": hosts(40),
    "one region": hosts(30, fleet_region="eu-west"),
    "two regions": hosts(20, "eu", fleet_region="eu-west") + hosts(10, "us", fleet_region="us-east"),
    "datacenters": hosts(9, "a", fleet_datacenter="dc1") + hosts(9, "b", fleet_datacenter="dc2"),
    "mixed": hosts(12, "eu", fleet_region="eu-west") + hosts(7, "bare"),
    "many regions": [h for r in range(7) for h in hosts(r + 1, f"r{r}", fleet_region=f"region-{r}")],
}


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("fleet", FLEETS, ids=list(FLEETS))
def test_slices_partition_the_selection(fleet, count):
    selection = FLEETS[fleet]
    shares = [take(selection, Slice(i, count)) for i in range(1, count + 1)]
    names = [h.name for share in shares for h in share]
    assert sorted(names) == sorted(h.name for h in selection)  # the union is the selection
    assert len(names) == len(set(names))  # no host in two slices
    for share in shares:  # each slice keeps the selection's own order
        assert share == [h for h in selection if h in share]


@pytest.mark.parametrize("fleet", FLEETS, ids=list(FLEETS))
def test_slices_do_not_depend_on_the_inventory_order(fleet):
    selection = list(FLEETS[fleet])
    before = assign(selection, 3)
    random.Random(7).shuffle(selection)
    assert assign(selection, 3) == before


def test_slices_are_a_pure_function_of_names_fixed_across_machines():
    # SHA-256 of name/slice, not Python's per-process hash(): these values hold on any controller.
    assert assign(hosts(6), 3) == {"gpu-000": 1, "gpu-001": 3, "gpu-002": 2, "gpu-003": 2, "gpu-004": 2,
                                   "gpu-005": 3}


@pytest.mark.parametrize("fleet, added", [
    ("no placement", Host("gpu-new")),
    ("mixed", Host("bare-new")),  # no placement var: the regions' share is unchanged
    ("two regions", Host("eu-new", {"fleet_region": "eu-west"})),  # 21:10 still gives eu-west 2 of 3 slices
])
def test_adding_an_unrelated_host_moves_only_that_host(fleet, added):
    before = assign(FLEETS[fleet], 3)
    after = assign(FLEETS[fleet] + [added], 3)
    assert {n: s for n, s in after.items() if n != added.name} == before


@pytest.mark.parametrize("sizes, count, owners", [
    ({"eu": 20, "us": 10}, 3, {"eu": (1, 2), "us": (3,)}),
    ({"eu": 10, "us": 10}, 2, {"eu": (1,), "us": (2,)}),
    ({"eu": 10, "us": 10}, 5, {"eu": (1, 2, 3), "us": (4, 5)}),  # a tie for the odd slice goes by name: 'eu'<'us'
    ({"eu": 30}, 3, {"eu": (1, 2, 3)}),
    ({"a": 20, "b": 10, "c": 1}, 4, {"a": (1, 2), "b": (3,), "c": (4,)}),
    # more regions than slices: whole regions packed, largest first onto the lightest slice
    ({"a": 20, "b": 10, "c": 1, "d": 3, "e": 1}, 2, {"a": (1,), "b": (2,), "d": (2,), "c": (2,), "e": (2,)}),
])
def test_regions_get_slices_by_host_count(sizes, count, owners):
    assert region_slices(Counter(sizes), count) == owners


def test_a_regions_hosts_stay_together_where_the_counts_allow():
    where = assign(FLEETS["two regions"], 3)
    assert {where[f"eu-{i:03d}"] for i in range(20)} == {1, 2}
    assert {where[f"us-{i:03d}"] for i in range(10)} == {3}
    datacenters = assign(FLEETS["datacenters"], 2)
    assert {datacenters[f"a-{i:03d}"] for i in range(9)} == {1} and {datacenters[f"b-{i:03d}"] for i in range(9)} == {2}
    many = assign(FLEETS["many regions"], 3)
    for r in range(7):  # seven regions in three slices: none split
        assert len({many[f"r{r}-{i:03d}"] for i in range(r + 1)}) == 1


def test_each_slice_names_the_regions_its_worker_should_run_in():
    assert placements(FLEETS["two regions"], 3) == {1: ("eu-west",), 2: ("eu-west",), 3: ("us-east",)}
    assert placements(FLEETS["no placement"], 2) == {1: (), 2: ()}


@pytest.mark.parametrize("text, spec", [("1/1", Slice(1, 1)), ("2/4", Slice(2, 4)), (" 4/4 ", Slice(4, 4))])
def test_slice_spec_reads(text, spec):
    assert Slice.parse(text) == spec and str(spec) == text.strip()


@pytest.mark.parametrize("command", ["facts", "plan", "audit", "provision"])
@pytest.mark.parametrize("bad", ["0/3", "4/3", "1/0", "3", "a/b", "-1/2", "1/2/3", ""])
def test_a_bad_slice_is_one_line_and_exit_1(command, bad, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([command, "inventory.yml", "--slice", bad])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "--slice" in err and len(err.splitlines()) == 1

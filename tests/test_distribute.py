"""fleetctl --slices N --engine ray: a command's slices run as Ray tasks next to their hosts' region,
a slice whose worker dies re-run, and the merged result the one a single controller prints.

The cluster test starts a real multi-node Ray cluster on this machine (a head and two worker nodes,
each its own `ray start`) and stops only what it started; its audit runs over lab hosts. Placement,
the slices' arguments and the errors are tested as data, with no cluster and no Ray."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fleetctl import cli
from fleetctl.facts.probe import QUERY_FIELDS
from fleetctl.fleet.distribute import Placement, _run_all, place, plan, slice_argv
from fleetctl.fleet.slicing import Slice, assign
from fleetctl.hosts.inventory import Host, load_inventory
from tests.conftest import NET_OFFSET, ROOT, fleetctl, wait_until
from tests.lab.standins import process_tree


def host(name: str, region: str | None = None) -> Host:
    return Host(name, vars={"fleet_region": region} if region else {})


# ---------------------------------------------------------------- placement (pure)

OFFERED = {"CPU": 3.0, "fleet_region:eu-west": 1.0, "fleet_region:us-east": 1.0}


@pytest.mark.parametrize("regions, resource, note", [
    (("eu-west",), "fleet_region:eu-west", "slice 1/3 (eu-west): on a node offering fleet_region:eu-west"),
    (("ap-south",), None, "slice 1/3 (ap-south): no node of the cluster offers fleet_region:ap-south; "
                          "it runs on any node"),
    (("eu-west", "us-east"), None, "slice 1/3: its hosts are in 2 regions; it runs on any node"),
    ((), None, "slice 1/3: its hosts have no fleet_region; it runs on any node"),
])
def test_a_slice_asks_for_its_region_only_where_a_node_offers_it(regions, resource, note):
    p = place(Slice(1, 3), regions, OFFERED)
    assert (p.resource, p.note) == (resource, note)


def test_each_slice_is_placed_by_its_hosts_region():
    hosts = [host(f"{r}-{i}", r) for r in ("eu-west", "us-east", "ap-south") for i in (1, 2)]
    placed = plan(hosts, 3, OFFERED)
    assert [(p.spec, p.regions, p.resource) for p in placed] == [
        (Slice(1, 3), ("ap-south",), None),  # regions take slices in name order
        (Slice(2, 3), ("eu-west",), "fleet_region:eu-west"),
        (Slice(3, 3), ("us-east",), "fleet_region:us-east"),
    ]
    assert plan(hosts, 3, {"CPU": 3.0})[1].resource is None  # a cluster with no regions runs everything anywhere


class VanishingRegion:
    """Just enough of Ray's API for _run_all: the one node offering fleet_region:us-east is gone
    (cluster_resources no longer lists it), so the task waiting for it would wait for ever."""

    class exceptions:
        RayError = RuntimeError

    def __init__(self):
        self.submitted, self.cancelled = [], []

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **kw):
                ray.submitted.append(kw["resources"])
                return self

            def remote(self, argv):
                return len(ray.submitted), tuple(argv)  # hashable, as an ObjectRef is

        return Task()

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if self.submitted[r[0] - 1] == {}]
        return ready, [r for r in refs if r not in ready]

    def cluster_resources(self):
        return {"CPU": 2.0}

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)

    def get(self, ref):
        argv = ref[1]
        return 0, json.dumps({"hosts": {}, "slice": argv[argv.index("--slice") + 1]}), "", "node-2"


def test_a_slice_whose_region_left_the_cluster_is_run_anywhere_not_waited_for():
    ray, moved = VanishingRegion(), []
    placed = [Placement(Slice(1, 2), ("eu-west",), None, "anywhere"),
              Placement(Slice(2, 2), ("us-east",), "fleet_region:us-east", "on us-east")]
    runs = _run_all(ray, placed, ["facts", "/inv.yml"], 2, moved.append)
    assert [r.spec for r in runs] == [Slice(1, 2), Slice(2, 2)] and all(r.exit == 0 for r in runs)
    assert ray.submitted == [{}, {"fleet_region:us-east": 0.001}, {}]  # submitted again, with no region
    assert ray.cancelled == [(2, ("facts", "/inv.yml", "--slice", "2/2", "--json"))]
    assert [m.note for m in moved] == ["slice 2/2 (us-east): no node offers fleet_region:us-east any more; "
                                       "it runs on any node"]


# ---------------------------------------------------------------- the slices' command line (pure)

@pytest.fixture
def inventory(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "hosts.yml"
    path.write_text("all:\n  hosts: {a: {fleet_region: eu}, b: {fleet_region: us}}\n")
    monkeypatch.chdir(tmp_path)  # the slices must not depend on the directory the user ran from
    return path


@pytest.mark.parametrize("argv, dests", [
    (["audit", "hosts.yml", "--lock", "fleet.lock", "--validate", "--since", "audit-1", "-l", "a", "-f", "7"],
     {"lock", "validate", "since", "limit", "forks"}),
    (["plan", "hosts.yml", "--cuda", "12.9", "--vllm", ">=0.20", "--mode", "container", "--write-lock", "-T", "9"],
     {"cuda", "vllm", "mode", "write_lock", "timeout"}),
    (["provision", "hosts.yml", "--check", "--revalidate", "--cuda", "12.9", "--wheelhouse", "wh"],
     {"check", "revalidate", "cuda", "wheelhouse", "timeout"}),
    (["facts", "hosts.yml", "--limit", "b"], {"limit"}),
])
def test_every_slice_repeats_the_command_with_absolute_paths(inventory, argv, dests):
    args = cli.parser().parse_args([*argv, "--slices", "2", "--engine", "ray"])
    words = slice_argv(cli.slice_command(args), Slice(2, 2))
    again = cli.parser().parse_args(words)
    assert again.slice == Slice(2, 2) and again.json and again.slices is None and again.engine is None
    assert again.inventories == [str(inventory)]
    for dest in dests - {"lock", "wheelhouse", "write_lock"}:
        assert getattr(again, dest) == getattr(args, dest), dest
    for dest in dests & {"lock", "wheelhouse"}:
        assert getattr(again, dest) == str(inventory.parent / getattr(args, dest)), dest
    if "write_lock" in dests:  # beside the inventory, named: the same file from any node's directory
        assert again.write_lock == str(inventory.parent / "fleet.lock")


def refused(argv, capsys) -> str:
    """The one line of a run that exits 1, whether argparse or the command refused it."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stopped:
        code = stopped.code
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, (code, err)
    return err


@pytest.mark.parametrize("extra, why", [
    (["--slices", "3"], "--slices N needs --engine ray"),
    (["--engine", "ray"], "--engine goes with --slices N"),
    (["--ray-address", "h:1"], "--ray-address goes with --slices N"),
    (["--slices", "3", "--slice", "1/3", "--engine", "ray"], "--slice: not allowed with argument --slices"),
    (["--slices", "0", "--engine", "ray"], "at least 1 slice"),
    (["--slices", "2", "--engine", "ray", "--retries", "-1"], "0 or more re-runs"),
    (["--slices", "2", "--engine", "ray", "--install-timer", "daily"], "--install-timer writes one controller's"),
])
def test_a_bad_combination_is_one_line_and_exit_1_before_any_work(inventory, capsys, extra, why, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # nothing may get as far as Ray
    assert why in refused(["audit", inventory, *extra], capsys)


def test_a_cluster_that_does_not_answer_is_one_line_not_a_wait(inventory, capsys):
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers there
        address = f"127.0.0.1:{s.getsockname()[1]}"
        err = refused(["facts", inventory, "--slices", "2", "--engine", "ray", "--ray-address", address], capsys)
    assert f"no Ray cluster answers at {address}: Connection refused" in err


def test_without_ray_the_error_says_how_to_install_it(inventory, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    err = refused(["facts", inventory, "--slices", "2", "--engine", "ray"], capsys)
    assert "--engine ray needs Ray, which is not installed (pip install 'fleetctl[ray]')" in err


# ---------------------------------------------------------------- a real cluster, a real audit

REGIONS = {"eu-west": ("eu-1", "eu-2"), "us-east": ("us-1", "us-2"), "ap-south": ("ap-1", "ap-2")}
NODES = {"head": "eu-west", "worker-1": "us-east", "worker-2": None}  # no node offers ap-south
GATED = "us-1"


class RayCluster:
    """A head and worker nodes, each `ray start --block` in a session of its own; stop() ends them
    and every process they started (never `ray stop`, which stops every Ray on the machine)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, region: str | None, n: int) -> None:
        head = not self.nodes
        # Worker ports of their own per node, clear of the lab's serving ports (18001 and up).
        argv = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus", "1",
                "--object-store-memory", "80000000", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                "--min-worker-port", str(24000 + 100 * n), "--max-worker-port", str(24099 + 100 * n),
                "--resources", json.dumps({f"fleet_region:{region}": 1} if region else {})]
        argv += (["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", str(self.root)]
                 if head else ["--address", self.address])
        # The nodes' workers run this checkout's fleetctl, as a real cluster's run the one installed there.
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = open(self.root.parent / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: "Ray runtime started" in self.log(name) or self.nodes[name].poll() is not None,
                   120, f"ray node {name} starting")
        assert self.nodes[name].poll() is None, self.log(name)[-3000:]

    def log(self, name: str) -> str:
        return (self.root.parent / f"{name}.log").read_text()

    def node_of(self, pid: int) -> str | None:
        """The node (by name) whose `ray start` *pid* descends from."""
        for name, proc in self.nodes.items():
            if pid in process_tree(proc.pid):
                return name
        return None

    def stop(self) -> None:
        everything = {p for proc in self.nodes.values() for p in process_tree(proc.pid)}
        for proc in reversed(list(self.nodes.values())):
            proc.terminate()  # `ray start --block` ends its node's processes on SIGTERM
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in everything:  # workers live in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_cluster():
    pytest.importorskip("ray")
    # Not under tmp_path: Ray's socket paths under it would pass the 107 bytes a Unix socket's name may have.
    root = Path(tempfile.mkdtemp(prefix="fleetctl-ray-", dir="/tmp"))
    cluster = RayCluster(root / "ray")
    cluster.root.mkdir()
    try:
        for n, (name, region) in enumerate(NODES.items()):
            cluster.start(name, region, n)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gate(lab_host) -> Path:
    """Make the host's nvidia-smi log each call and wait until the test opens the gate (a file)."""
    smi, real = lab_host.dir / "bin" / "nvidia-smi", lab_host.dir / "bin" / "nvidia-smi.real"
    smi.rename(real)
    d = lab_host.dir
    smi.write_text(f'#!/bin/sh\necho "$*" >> {d}/smi-calls\n'
                   f'while [ ! -e {d}/gate-open ]; do sleep 0.1; done\nexec {real} "$@"\n')
    smi.chmod(0o755)
    (d / "gate-open").touch()
    return d


def query_calls(d: Path) -> int:
    """How many probes reached the host's GPU inventory query (one a probe; its health queries are others)."""
    path = d / "smi-calls"
    return sum(f"--query-gpu={QUERY_FIELDS}" in line for line in path.read_text().splitlines()) if path.exists() else 0


def controller_of(slice_spec: str, cluster: RayCluster) -> int | None:
    """The pid of the cluster's fleetctl process running slice *slice_spec* (its --slice argument)."""
    for proc in cluster.nodes.values():
        for pid in process_tree(proc.pid):
            try:
                words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fleetctl.cli" in words and b"--slice" in words and slice_spec.encode() in words:
                return pid
    return None


def running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def timeless(value):
    """*value* without what differs from run to run of the same hosts: how long things took, and how much disk
    is free (the lab's hosts share this machine's disk, which a Ray cluster's start fills by a GiB)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in ("duration", "disk_free_gib")}
    if isinstance(value, str):
        return re.sub(r"[\d.]+ GiB free", "… GiB free", value)
    return [timeless(v) for v in value] if isinstance(value, list) else value


def test_an_audit_as_3_ray_slices_survives_a_killed_worker_and_matches_one_controller(small_lab, ray_cluster,
                                                                                      tmp_path):
    profiles = ["h100-sxm-80gb", "l4", "a100-sxm4-80gb", "t4", "h200-sxm-141gb", "rtx4090"]
    lab = small_lab(*[(name, profiles.pop(), {"fleet_region": region})
                      for region, names in REGIONS.items() for name in names], net=98)
    inventory = lab.write_inventory(tmp_path / "fleet.yml")
    assert fleetctl("plan", inventory, "--write-lock", "--limit", "!ap-2").returncode == 0  # ap-2 unlocked: drift
    ray = ("--engine", "ray", "--ray-address", ray_cluster.address)
    planned, sliced_plan = fleetctl("plan", inventory, "--json"), fleetctl("plan", inventory, "--slices", "3", *ray)
    assert sliced_plan.stdout == planned.stdout and sliced_plan.returncode == planned.returncode == 0, \
        sliced_plan.stderr[-3000:]  # a plan's JSON is the single run's, byte for byte
    checked, sliced_check = (fleetctl("provision", inventory, "--check", "--json"),
                             fleetctl("provision", inventory, "--check", "--slices", "3", *ray))
    one_record, merged_record = json.loads(checked.stdout), json.loads(sliced_check.stdout)
    assert sliced_check.returncode == checked.returncode and list(merged_record) == list(one_record)
    assert timeless(merged_record["hosts"]) == timeless(one_record["hosts"]), sliced_check.stderr[-3000:]
    d = gate(lab.hosts[GATED])
    one = fleetctl("audit", inventory, "--format", "json")
    assert one.returncode == 2 and query_calls(d) == 1, one.stderr[-2000:]  # one probe per host and audit

    (d / "gate-open").unlink()
    (d / "smi-calls").unlink()
    spec = f"{assign(load_inventory(inventory).select(None), 3)[GATED]}/3"
    sliced = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "audit", str(inventory), "--slices", "3", *ray,
                               "--format", "json",
                               "-T", "300"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: query_calls(d) == 1, 180, f"{GATED}'s slice reaching its nvidia-smi")
        controller = wait_until(lambda: controller_of(spec, ray_cluster), 30, f"the controller of slice {spec}")
        worker = int((Path("/proc") / str(controller) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ray_cluster.node_of(worker) == "worker-1"  # the node offering fleet_region:us-east
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not running(controller), 30, "the killed worker's controller ending with it")
        (d / "gate-open").touch()
        out, err = sliced.communicate(timeout=240)
    finally:
        sliced.kill()
        (d / "gate-open").touch()

    assert sliced.returncode == one.returncode == 2, err[-3000:]
    merged, single = json.loads(out), json.loads(one.stdout)
    assert merged["hosts"] == single["hosts"] and list(merged["hosts"]) == list(single["hosts"])
    assert merged["hosts"]["ap-2"]["status"] != "ok"
    assert len(merged["run_id"].split("+")) == 3
    assert query_calls(d) == 2  # the slice ran twice: killed, then re-run by Ray
    assert "(us-east): on a node offering fleet_region:us-east" in err
    assert "(ap-south): no node of the cluster offers fleet_region:ap-south; it runs on any node" in err

"""The wheelhouse: platform tags and class plans as data, a recorded pip report's closure, and on
the lab a real download, a manifest, and an offline provision from it by hosts with no network."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply.wheelhouse import (
    HostInput, Platform, build, class_for, closure, left_out, plan_classes, platform_tags,
    provided_by_host, read_manifest, wheel_for,
)
from fleetctl.decide.resolve import Stack
from fleetctl.errors import WheelhouseError
from fleetctl.facts.probe import Facts, Gpu
from tests.conftest import fleetctl, fleetctl_json

REPORT = Path(__file__).parent / "data" / "wheelhouse" / "pip-report-flashinfer-cp312.json"


def facts(python="3.12.3", glibc="2.39", arch="x86_64", packages=None, torch=None) -> Facts:
    return Facts(gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-0", "9.0", 81559, None),), arch=arch, glibc=glibc,
                 python={"path": "/usr/bin/python3", "version": python, "torch": torch, "torch_cuda": "13.0" if torch else None,
                         "packages": packages or {}})


KERNELS = Stack(python="3.12", torch="2.11.0+cu130", cuda="13.0", torch_index=None, vllm=None, vllm_package=None,
                flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None, attention_backend=None,
                cudagraph_mode=None, torch_cuda_arch_list="9.0", system_site_packages=True)
VLLM = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index="https://download.pytorch.org/whl/cu130",
             vllm="0.33.0", vllm_package="vllm", flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None,
             attention_backend="FLASH_ATTN", cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0",
             packages=("flashinfer-jit-cache==0.7.2.post1",))


# ---------------------------------------------------------------- platform tags

@pytest.mark.parametrize("glibc, first, count", [("2.31", "manylinux_2_31_x86_64", 30),
                                                 ("2.35", "manylinux_2_35_x86_64", 34),
                                                 ("2.39", "manylinux_2_39_x86_64", 38)])
def test_every_manylinux_tag_the_glibc_admits(glibc, first, count):
    tags = platform_tags(glibc, "x86_64")
    assert tags[0] == first and tags[-2:] == ("manylinux_2_5_x86_64", "manylinux1_x86_64")
    assert len(tags) == count  # 2_5 … 2_N, plus manylinux2014, manylinux2010 and manylinux1
    assert tags.index("manylinux2014_x86_64") == tags.index("manylinux_2_17_x86_64") + 1
    assert tags.index("manylinux2010_x86_64") == tags.index("manylinux_2_12_x86_64") + 1
    assert f"manylinux_2_{int(glibc.split('.')[1]) + 1}_x86_64" not in tags


def test_aarch64_starts_at_manylinux2014():
    tags = platform_tags("2.39", "aarch64")
    assert tags[0] == "manylinux_2_39_aarch64" and tags[-2:] == ("manylinux_2_17_aarch64", "manylinux2014_aarch64")
    assert not any("2010" in t or "manylinux1" in t or "x86_64" in t for t in tags)


@pytest.mark.parametrize("python, abi", [("3.10", "cp310"), ("3.12", "cp312")])
def test_pip_is_told_the_hosts_interpreter_and_every_tag(python, abi):
    args = Platform(python, "2.35", "x86_64").pip_args()
    assert args[:7] == ["--python-version", python, "--implementation", "cp", "--abi", abi, "--only-binary=:all:"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--platform"] == list(platform_tags("2.35", "x86_64"))


def test_the_wheel_pip_would_pick_for_a_platform():
    files = ["apache_tvm_ffi-0.1.11-cp310-cp310-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
             "apache_tvm_ffi-0.1.11-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
             "vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"]
    assert "cp310" in wheel_for(files, "Apache_TVM_FFI", "0.1.11", Platform("3.10", "2.31", "x86_64"))
    assert "cp312" in wheel_for(files, "apache-tvm-ffi", "0.1.11", Platform("3.12", "2.39", "x86_64"))
    assert wheel_for(files, "vllm", "0.26.0", Platform("3.12", "2.39", "x86_64")) == files[2]  # abi3
    assert wheel_for(files, "vllm", "0.26.0", Platform("3.12", "2.27", "x86_64")) is None  # glibc too old
    assert wheel_for(files, "vllm", "0.26.0", Platform("3.12", "2.39", "aarch64")) is None


# ---------------------------------------------------------------- class plans

def test_hosts_with_one_stack_and_platform_share_a_class():
    install = {"no_deps": False, "extra_packages": ["apache-tvm-ffi"]}
    inputs = [HostInput("b", facts(), VLLM, install), HostInput("a", facts(), VLLM, install),
              HostInput("c", facts(glibc="2.31"), VLLM, install),
              HostInput("d", facts(arch="aarch64"), VLLM, install),
              HostInput("e", facts(python="3.10.12"), replace(VLLM, python="3.10"), install)]
    plans = {tuple(p.hosts): p for p in plan_classes(inputs)}
    assert set(plans) == {("a", "b"), ("c",), ("d",), ("e",)}
    ab = plans[("a", "b")]
    assert ab.name == f"{VLLM.id}-cp312-glibc2.39-x86_64" and ab.stack_id == VLLM.id
    assert ab.requirements == ("torch==2.14.0", "vllm==0.33.0", "flashinfer-python==0.7.2.post1",
                               "flashinfer-jit-cache==0.7.2.post1", "apache-tvm-ffi")
    assert ab.indexes == ("https://download.pytorch.org/whl/cu130",) and not ab.no_deps and ab.constraints == []
    assert plans[("c",)].platform.tags[0] == "manylinux_2_31_x86_64"
    assert plans[("d",)].platform.tags[0] == "manylinux_2_39_aarch64"
    assert plans[("e",)].platform.pip_args()[:2] == ["--python-version", "3.10"]


def test_a_reused_torch_pins_the_hosts_packages_but_not_the_ones_asked_for():
    host = {"torch": "2.11.0+cu130", "numpy": "2.4.6", "flashinfer-python": "0.6.1", "weird": "not a version!"}
    (plan,) = plan_classes([HostInput("gpu", facts(packages=host, torch="2.11.0+cu130"), KERNELS,
                                      {"no_deps": True, "extra_packages": ["apache-tvm-ffi"]})])
    assert plan.requirements == ("flashinfer-python==0.7.2.post1", "apache-tvm-ffi")  # no torch pin: reused
    assert plan.no_deps
    # flashinfer-python is asked for, so the host's older one is no constraint; +cu130 is the host's build of 2.11.0
    assert plan.constraints == ["numpy==2.4.6", "torch==2.11.0"]
    # Two hosts with other packages need other downloads: classes of their own.
    other = plan_classes([HostInput("gpu", facts(packages=host, torch="2.11.0+cu130"), KERNELS, {"no_deps": True}),
                          HostInput("gpu2", facts(packages={**host, "numpy": "1.26.4"}, torch="2.11.0+cu130"),
                                    KERNELS, {"no_deps": True})])
    assert len(other) == 2 and other[0].name != other[1].name


def test_a_host_without_glibc_is_named():
    with pytest.raises(WheelhouseError, match="nohost: its facts have no glibc"):
        plan_classes([HostInput("nohost", facts(glibc=None), VLLM, {})])


# ---------------------------------------------------------------- a recorded pip report

def test_closure_what_the_host_has_and_what_no_deps_leaves_out():
    """pip's report for flashinfer-python 0.7.2.post1 + apache-tvm-ffi on cp312 manylinux x86_64
    with torch==2.11.0 as a constraint (recorded on this project's CI machine, metadata trimmed)."""
    chosen = closure(json.loads(REPORT.read_text()))
    assert chosen["flashinfer-python"]["version"] == "0.7.2.post1"
    assert chosen["flashinfer-python"]["file"] == "flashinfer_python-0.7.2.post1-py3-none-any.whl"
    assert len(chosen["apache-tvm-ffi"]["sha256"]) == 64
    assert chosen["torch"]["version"] == "2.11.0" and "typing-extensions" in chosen and "jinja2" in chosen
    host = {"torch": "2.11.0+cu130", "numpy": "2.4.6", "jinja2": "3.1.4", "pip": "25.0"}
    assert provided_by_host(chosen, host) == ["numpy==2.4.6", "torch==2.11.0+cu130"]  # jinja2 3.1.4 ≠ 3.1.6
    out = left_out(chosen, ["flashinfer-python", "apache-tvm-ffi"], host)
    assert "nvidia-cutlass-dsl==4.8.1" in out and "cuda-python==13.4.4" in out
    assert not any(p.startswith(("torch==", "numpy==", "jinja2==", "flashinfer-python==", "apache-tvm-ffi=="))
                   for p in out)
    assert out == sorted(out) and len(out) == len(chosen) - 5


def test_extra_packages_that_contradict_the_stack_still_get_a_left_out_list(tmp_path):
    """no_deps exists for hand-picked sets pip would refuse (xgrammar 0.2.7 beside a vLLM that pins
    0.2.8): the stack's own closure still says what the host must provide."""
    report = json.loads(REPORT.read_text())
    (plan,) = plan_classes([HostInput("gpu", facts(packages={"torch": "2.11.0+cu130"}, torch="2.11.0+cu130"),
                                      KERNELS, {"no_deps": True, "extra_packages": ["apache-tvm-ffi==0.1.10"]})])
    assert plan.stack_requirements == ("flashinfer-python==0.7.2.post1",)
    calls, fake = [], fake_pip(report, [])

    def refuse_extras(args):
        calls.append(args)
        if args[0] == "install" and "apache-tvm-ffi==0.1.10" in args:
            return subprocess.CompletedProcess(args, 1, "", "ERROR: ResolutionImpossible: conflicting apache-tvm-ffi\n")
        return fake(args)
    (result,) = build([plan], tmp_path, runner=refuse_extras)
    assert [c[0] for c in calls] == ["install", "install", "download", "download"]  # the last: uv's wheel
    assert calls[2][-2:] == ["flashinfer-python==0.7.2.post1", "apache-tvm-ffi==0.1.10"]
    entry = result.entry
    assert "numpy==2.4.6" in entry["left_out"] and not any(p.startswith("apache-tvm-ffi") for p in entry["left_out"])
    assert entry["left_out_note"].endswith("ResolutionImpossible: conflicting apache-tvm-ffi")


def fake_pip(report: dict, calls: list, fail_download: str | None = None):
    """pip as a seam: the install --dry-run writes the recorded report, download writes each
    pinned file the report names (bytes of the pin, so sha256s are checkable)."""
    chosen = closure(report)

    def run(args):
        calls.append(args)
        if args[0] == "install":
            Path(args[args.index("--report") + 1]).write_text(json.dumps(report))
            return subprocess.CompletedProcess(args, 0, "", "")
        if fail_download:
            return subprocess.CompletedProcess(args, 1, "", f"ERROR: {fail_download}\n")
        dest = Path(args[args.index("--dest") + 1])
        for pin in (a for a in args if "==" in a):
            name, version = pin.split("==")
            file = chosen[name]["file"] if name in chosen and chosen[name]["version"] == version else \
                f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            (dest / file).write_bytes(pin.encode())
        return subprocess.CompletedProcess(args, 0, "", "")
    return run


def test_full_closure_skips_what_the_host_has(tmp_path):
    report = json.loads(REPORT.read_text())
    host = {"torch": "2.11.0+cu130", "numpy": "2.4.6"}
    (plan,) = plan_classes([HostInput("gpu", facts(packages=host, torch="2.11.0+cu130"), KERNELS,
                                      {"extra_packages": ["apache-tvm-ffi"]})])
    calls = []
    (result,) = build([plan], tmp_path, runner=fake_pip(report, calls))
    assert result.ok, result.error
    install, download, uv = calls
    assert uv[-1] == "uv==0.13.9" and "manylinux_2_39_x86_64" in uv  # the binary provision carries, for the platform
    constraints = Path(install[install.index("-c") + 1])  # gone with its temporary directory, but was passed
    assert constraints.name == "host-constraints.txt"
    assert "--no-deps" in download and "torch==2.11.0" not in download and "numpy==2.4.6" not in download
    assert "nvidia-cutlass-dsl==4.8.1" in download and "flashinfer-python==0.7.2.post1" in download
    entry = read_manifest(tmp_path)["classes"][plan.name]
    assert entry["provided_by_host"] == ["numpy==2.4.6", "torch==2.11.0+cu130"] and entry["left_out"] == []
    assert entry["installer"]["name"] == "uv-0.13.9-py3-none-any.whl" and entry["installer"]["sha256"] == \
        hashlib.sha256(b"uv==0.13.9").hexdigest()
    assert len(entry["files"]) == len(closure(report)) - 2
    for f in entry["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / f["name"]).read_bytes()).hexdigest()
    assert entry["platform"]["tags"] == list(platform_tags("2.39", "x86_64"))


def test_no_deps_fetches_the_listed_packages_and_names_the_rest(tmp_path):
    report = json.loads(REPORT.read_text())
    (plan,) = plan_classes([HostInput("gpu", facts(packages={"torch": "2.11.0+cu130"}, torch="2.11.0+cu130"),
                                      KERNELS, {"no_deps": True, "extra_packages": ["apache-tvm-ffi"]})])
    calls = []
    (result,) = build([plan], tmp_path, runner=fake_pip(report, calls))
    download = calls[1]
    assert download[-2:] == ["flashinfer-python==0.7.2.post1", "apache-tvm-ffi==0.1.15.post2"]  # as resolved
    entry = result.entry
    assert [f["name"].split("-")[0] for f in entry["files"]] == ["apache_tvm_ffi", "flashinfer_python"]
    assert entry["no_deps"] and "numpy==2.4.6" in entry["left_out"] and not any(
        p.startswith("torch==") for p in entry["left_out"])


def test_a_download_pip_refuses_is_one_line_naming_the_hosts(tmp_path):
    report = json.loads(REPORT.read_text())
    plans = plan_classes([HostInput(h, facts(), KERNELS, {"no_deps": True}) for h in ("gpu-1", "gpu-2")])
    (result,) = build(plans, tmp_path, runner=fake_pip(report, [], fail_download=(
        "No matching distribution found for flashinfer-python==0.7.2.post1")))
    assert not result.ok and "\n" not in result.error
    assert result.error.startswith(f"class {plans[0].name} (gpu-1, gpu-2): pip cannot download for "
                                   "cp312 manylinux_2_39 x86_64: No matching distribution found")
    assert read_manifest(tmp_path) == {"version": 1, "classes": {}}


def test_a_host_finds_its_class_or_a_one_line_refusal():
    manifest = {"version": 1, "classes": {
        "x": {"hosts": ["other"], "stack_id": KERNELS.id, "platform": {"python": "3.12", "glibc": "2.39", "arch": "x86_64"}},
        "y": {"hosts": ["gpu"], "stack_id": KERNELS.id, "platform": {"python": "3.12", "glibc": "2.39", "arch": "x86_64"}},
    }}
    assert class_for(manifest, "gpu", KERNELS, facts())[0] == "y"
    assert class_for(manifest, "new-host", KERNELS, facts())[0] == "x"
    with pytest.raises(WheelhouseError) as err:
        class_for(manifest, "gpu", KERNELS, facts(glibc="2.35"))
    assert str(err.value) == (f"the wheelhouse has no wheels for stack {KERNELS.id} on this host's platform "
                              "(cp312 manylinux_2_35 x86_64) (run fleetctl wheelhouse INVENTORY DIR for gpu)")


# ---------------------------------------------------------------- on the lab

OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "PIP_RETRIES": "0"}
PLAYBOOK = """
- name: FlashInfer on the image's torch, listed packages only
  hosts: gpu-a
  vars: {fleet_vllm: none, fleet_system_site_packages: true}
  steps: [check, install, verify]
  install: {no_deps: true, extra_packages: [apache-tvm-ffi]}
- name: the image's torch and a full closure of one package
  hosts: gpu-b
  vars: {fleet_vllm: none, fleet_system_site_packages: true}
  steps: [check, install, verify]
  install: {extra_packages: [requests]}
"""


def base_python(version: str) -> Path | None:
    found = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    return found[-1] if found else None


def image_python(root: Path, base: Path, torch: str, cuda: str) -> Path:
    """A host Python as a GPU image has one: a venv whose torch is already there. The lab has no
    GPU, so its torch is a stand-in (its metadata and torch.version, as the probe and verify read
    them), the way the lab's nvidia-smi replays a capture."""
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python3.*/site-packages"))
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(f'__version__ = "{torch}"\nfrom . import version\n')
    (site / "torch" / "version.py").write_text(f'__version__ = "{torch}"\ncuda = "{cuda}"\n')
    dist = site / f"torch-{torch}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch}\n")
    (dist / "RECORD").write_text("")
    return root / "bin" / "python"


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir()}


def test_wheelhouse_then_an_offline_provision_on_the_lab(small_lab, tmp_path):
    py312, py310 = base_python("3.12"), base_python("3.10")
    if not (py312 and py310):
        pytest.skip("needs Python 3.12 and 3.10 (pyenv) for two host platforms")
    pya = image_python(tmp_path / "image-a", py312, "2.11.0+cu130", "13.0")
    pyb = image_python(tmp_path / "image-b", py310, "2.5.1+cu121", "12.1")
    site_b = next((tmp_path / "image-b").glob("lib/python3.*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site_b), "idna==3.20"],
                   check=True)  # the image already has idna: the wheelhouse must not carry it
    lab = small_lab(("gpu-a", "h100-sxm-80gb", {"ansible_python_interpreter": str(pya), "env": OFFLINE}),
                    ("gpu-b", "v100-sxm2-32gb", {"ansible_python_interpreter": str(pyb), "env": OFFLINE}), net=83)
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(PLAYBOOK)
    # The hosts really have no index: pip there, without this machine's config, reaches nothing.
    probe = lab.ssh("gpu-a", f"PIP_CONFIG_FILE=/dev/null {py312} -m pip download -q --no-cache-dir --no-deps "
                             f"-d {tmp_path / 'nope'} six")
    assert probe.returncode != 0 and "No matching distribution found for six" in probe.stderr, probe.stdout

    dest = tmp_path / "wheelhouse"
    code, out = fleetctl_json("wheelhouse", inventory, dest, "--playbook", playbook, timeout=600)
    assert code == 0, out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["classes"] == out["classes"]
    by_host = {c["hosts"][0]: (name, c) for name, c in manifest["classes"].items()}
    assert sorted(by_host) == ["gpu-a", "gpu-b"] and all(len(c["hosts"]) == 1 for c in manifest["classes"].values())
    glibc = manifest["classes"][by_host["gpu-a"][0]]["platform"]["glibc"]
    for host, python in (("gpu-a", "3.12"), ("gpu-b", "3.10")):
        name, c = by_host[host]
        assert c["platform"]["python"] == python and name.endswith(f"-cp{python.replace('.', '')}-glibc{glibc}-x86_64")
        assert c["platform"]["tags"] == list(platform_tags(glibc, "x86_64"))
        for f in c["files"]:
            data = (dest / f["name"]).read_bytes()
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (f["sha256"], f["size"])
    a, b = by_host["gpu-a"][1], by_host["gpu-b"][1]
    assert a["no_deps"] and sorted(f["name"].split("-")[0] for f in a["files"]) == ["apache_tvm_ffi", "flashinfer_python"]
    assert any("-cp312-cp312-manylinux" in f["name"] for f in a["files"])  # apache-tvm-ffi built for the host's Python
    assert "torch==2.11.0+cu130" in a["provided_by_host"] and a["left_out"]
    assert not any(p.startswith(("torch==", "flashinfer-python==", "apache-tvm-ffi==")) for p in a["left_out"])
    assert not b["no_deps"] and b["left_out"] == [] and "idna==3.20" in b["provided_by_host"]
    names_b = sorted(f["name"].split("-")[0].lower() for f in b["files"])
    assert names_b == ["certifi", "charset_normalizer", "requests", "urllib3"]
    assert any("-cp310-cp310-manylinux" in f["name"] for f in b["files"])  # charset-normalizer, for Python 3.10

    code, record = fleetctl_json("provision", inventory, "--playbook", playbook, "--wheelhouse", dest, timeout=900)
    assert code == 0, [(h, s["name"], s["detail"], s.get("tail")) for h, run in record["hosts"].items() for s in run["steps"]
                       if s["status"] == "failed"] or record
    for host, (name, c) in by_host.items():
        run = record["hosts"][host]
        install = next(s for s in run["steps"] if s["name"] == "install")
        assert install["status"] == "changed" and install["data"]["wheelhouse_class"] == name, install
        assert next(s for s in run["steps"] if s["name"] == "verify")["status"] == "ok"
        pushed = lab.hosts[host].fleet_root / "wheelhouse" / name
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pushed.iterdir()} == {
            f["name"]: f["sha256"] for f in c["files"]}  # this class's files, no other
    install_a = next(s for s in record["hosts"]["gpu-a"]["steps"] if s["name"] == "install")
    assert "no_deps left out (the host must provide): " in install_a["detail"]
    assert install_a["data"]["left_out"] == a["left_out"]
    env_b = f"{lab.hosts['gpu-b'].vars.get('fleet_root', '/opt/fleetctl')}/envs/{b['stack_id']}/bin/python"
    got = lab.ssh("gpu-b", f"{env_b} -c 'import requests, idna, importlib.metadata as m; "
                           "print(m.version(\"requests\"), m.version(\"idna\"), idna.__file__)'")
    assert got.returncode == 0, got.stderr
    version, idna, where = got.stdout.split()
    assert any(f["name"].startswith(f"requests-{version}-") for f in b["files"])
    assert idna == "3.20" and where.startswith(str(site_b))  # the image's idna, not a copy

    # Air-gapped: the facts gathered on the isolated side, the wheelhouse built again from them.
    code, facts_json = fleetctl_json("facts", inventory)
    (tmp_path / "facts.json").write_text(json.dumps(facts_json))
    before, text = snapshot(dest), (dest / "manifest.json").read_bytes()
    again = fleetctl("wheelhouse", inventory, dest, "--playbook", playbook, "--facts", tmp_path / "facts.json",
                     timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(", 0 new") == 2 and "left out by no_deps" in again.stdout
    assert snapshot(dest) == before and (dest / "manifest.json").read_bytes() == text


PIP_CONFLICT = """ERROR: Cannot install vllm==0.26.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    vllm 0.26.0 depends on numba==0.65.0
    The user requested (constraint) numba==0.68.0

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip attempt to solve the dependency conflict
"""


def test_a_host_package_the_stack_needs_at_another_version_is_named():
    """pip's own words (vLLM 0.26.0 against the GPU test host's image, recorded): the constraint is
    let go and the conflict reported, not the whole closure lost."""
    from fleetctl.apply.wheelhouse import host_conflicts
    assert host_conflicts(PIP_CONFLICT) == {"numba": "vllm 0.26.0 depends on numba==0.65.0"}
    assert host_conflicts("ERROR: No matching distribution found for vllm==9.9") == {}


# ---------------------------------------------------------------- uv's resolution

UV_COMPILED = Path(__file__).parent / "data" / "wheelhouse" / "uv-compile-vllm-0.26.0-cp312-manylinux_2_39.txt"
UV_CONFLICT = Path(__file__).parent / "data" / "wheelhouse" / "uv-compile-conflict.stderr"


@pytest.mark.parametrize("glibc, arch, want", [("2.39", "x86_64", "x86_64-manylinux_2_39"),
                                               ("2.29", "x86_64", "x86_64-manylinux_2_28"),
                                               ("2.17", "aarch64", "aarch64-manylinux_2_17"),
                                               ("2.43", "aarch64", "aarch64-manylinux_2_40"),
                                               ("2.12", "x86_64", None), ("2.39", "ppc64le", None)])
def test_uv_is_told_the_newest_manylinux_it_names_that_the_host_admits(glibc, arch, want):
    from fleetctl.apply.wheelhouse import uv_platform
    assert uv_platform(Platform("3.12", glibc, arch)) == want


def test_uvs_compiled_closure_with_who_asked_for_each():
    """Recorded: vLLM 0.26.0's closure for the GPU test host (cp312, glibc 2.39), one uv pass."""
    from fleetctl.apply.wheelhouse import uv_closure, uv_host_conflicts
    chosen = uv_closure(UV_COMPILED.read_text())
    assert len(chosen) == 197 and chosen["numba"] == {"version": "0.65.0", "file": None, "sha256": None, "via": ["vllm"]}
    assert chosen["flashinfer-python"]["via"] == ["vllm"]  # the requirements file is not a package
    host = {"numba": "0.68.0", "torch": "2.11.0+cu130", "pyyaml": "6.0.3"}
    assert uv_host_conflicts(chosen, host) == ["vllm needs numba==0.65.0 (the host has numba 0.68.0)"]


def fake_uv(calls: list, compiled: str | None = None, stderr: str = ""):
    """uv as a seam: ``pip compile`` reads its output file (the preferences), then writes *compiled*."""
    def run(args, env):
        output = Path(args[args.index("--output-file") + 1])
        calls.append((args, dict(env), output.read_text()))
        if compiled is None:
            return subprocess.CompletedProcess(args, 1, "", stderr)
        output.write_text(compiled)
        return subprocess.CompletedProcess(args, 0, "", "")
    return run


def test_uv_resolves_in_one_pass_and_names_what_shadows_the_host(tmp_path):
    """The host's packages go to uv as preferences (the seeded output file), not constraints: the
    numba vLLM pins is simply chosen, and named, with no second resolution; the index URL, which
    carries a credential, is in uv's environment, never its argv."""
    host = {"numba": "0.68.0", "torch": "2.11.0+cu130", "six": "1.17.0"}
    stack = replace(KERNELS, torch_index="https://user:s3cret@download.example/whl/cu130")
    (plan,) = plan_classes([HostInput("gpu", facts(packages=host, torch="2.11.0+cu130"), stack, {"no_deps": True})])
    uv_calls, pip_calls = [], []
    (result,) = build([plan], tmp_path, runner=fake_pip(json.loads(REPORT.read_text()), pip_calls),
                      uv=fake_uv(uv_calls, UV_COMPILED.read_text()))
    assert result.ok, result.error
    ((args, env, preferences),) = uv_calls
    assert preferences.splitlines() == ["numba==0.68.0", "six==1.17.0", "torch==2.11.0"]
    assert args[args.index("--python-platform") + 1] == "x86_64-manylinux_2_39"
    assert not any("s3cret" in a for a in args) and "s3cret" in env["UV_EXTRA_INDEX_URL"]
    assert [c[0] for c in pip_calls] == ["download", "download"]  # pip resolves nothing
    entry = result.entry
    assert entry["resolver"] == "uv" and entry["host_conflicts"] == [
        "vllm needs numba==0.65.0 (the host has numba 0.68.0)"]
    assert "torch==2.11.0+cu130" in entry["provided_by_host"] and "numpy==2.3.5" in entry["left_out"]
    assert "s3cret" not in json.dumps(read_manifest(tmp_path))


def test_a_closure_uv_cannot_resolve_is_one_line(tmp_path):
    (plan,) = plan_classes([HostInput("gpu-1", facts(), VLLM, {})])
    (result,) = build([plan], tmp_path, runner=fake_pip({}, []), uv=fake_uv([], stderr=UV_CONFLICT.read_text()))
    assert not result.ok and "\n" not in result.error
    assert result.error.startswith(f"class {plan.name} (gpu-1): uv cannot resolve torch==2.14.0 vllm==0.33.0 ")
    assert "Because vllm==0.26.0 depends on numba==0.65.0 and numba==0.68.0" in result.error


def test_pip_resolves_when_asked_to(tmp_path):
    (plan,) = plan_classes([HostInput("gpu", facts(), KERNELS, {})])
    uv_calls, pip_calls = [], []
    (result,) = build([plan], tmp_path, runner=fake_pip(json.loads(REPORT.read_text()), pip_calls),
                      uv=fake_uv(uv_calls, UV_COMPILED.read_text()), resolver="pip")
    assert result.ok and uv_calls == [] and [c[0] for c in pip_calls] == ["install", "download", "download"]
    assert result.entry["resolver"] == "pip"

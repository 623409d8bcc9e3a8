#!/bin/sh
# The GPU proof, run on the GPU test host from the repository root (tests/gpu/README.md says how
# the wheelhouse gets there). Phases, each well inside one device call's 10 minutes:
#   health  — fleetctl health (--json, prometheus, table) and facts --json; needs no wheelhouse
#   join    — join the carried pieces in /root/store, check their sha256, unpack the wheelhouse
#   serve   — facts, plan, then `fleetctl provision` serving vLLM from the image's torch
#   again   — a second provision (changes nothing), a warm restart of the service,
#             plan --write-lock and audit --validate
#   beside  — after serve (issue 25): the GPU's memory and who holds it; `provision --revalidate`
#             proving the serving stack again beside itself; a rollout to another stack id from
#             the same wheels (tests/gpu/gpu-test-host-b.yml), gated beside the old stack, which
#             serves until activate. /v1/models is asked every second throughout (watch-*.log)
#   gatefail — after beside: a rollout (tests/gpu/gpu-test-host-c.yml) whose gate is made to fail
#             (the smoke test asked for a model that is not there): the old stack keeps serving
#   exclusive — after beside (optional): provision --revalidate with fleet_proof_mode: exclusive
#             (tests/gpu/gpu-test-host-b-exclusive.yml): the service stops for the proofs, serves
#             again after them, and the record has the downtime
#   classcache — after serve (issue 28): serve's provision was its class's canary and kept its
#             compiled kernels in the controller's store; this host then plays a second host of the
#             class: its caches cleared (the stack's <env>/cache, ~/.cache/flashinfer and ~/.cache/vllm),
#             the service stopped, and `provision --revalidate` pushes the class cache before validate
#   model   — after join or serve (issue 29): a tiny Llama pulled into the controller's store (the smoke's,
#             or one written by smoke.py), staged by provision (tests/gpu/gpu-test-host-model.yml) and
#             served from the staged copy; straight after join that provision is the host's first (cold)
#   mend    — after model: a byte flipped in the staged copy is audit drift; the next provision sends
#             that file again
# What each phase shows goes to $OUT (the device tool brings it back), else ./gpu-proof.
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-proof}
mkdir -p "$out"
inv=${INVENTORY:-inventories/gpu-test-host.yml}
book=${PLAYBOOK:-playbooks/gpu-serve.yml}
wheels=/root/wheelhouse
fleet() { python3 -m fleetctl.cli "$@"; }
stamp() { echo "== $(date +%T) $*"; }
# Figures from a provision record: each step's status, duration and the numbers that matter.
figures() {
  python3 - "$1" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))
for name, host in record["hosts"].items():
    print(f"{name}: {host.get('status')} {host.get('error') or ''}")
    if host.get("proof"):
        print(f"  proofs {host['proof'].get('mode')}: {host['proof'].get('refusal') or host['proof'].get('reason')}")
    if host.get("downtime_s") is not None:
        print(f"  downtime {host['downtime_s']} s")
    for s in host.get("steps", []):
        keep = {k: v for k, v in (s.get("data") or {}).items() if k in (
            "time_to_healthy_s", "ttft_s", "completion_tokens", "observed", "gpus", "tensor_parallel_size",
            "compile_cache", "key", "from", "bytes")}
        print(f"  {s['name']:9} {s['status']:8} {s['duration']:7.1f}s  {s['detail'][:160]}")
        if keep:
            print(f"            {json.dumps(keep)[:600]}")
        if s["status"] == "failed" and s.get("tail"):
            print("            " + s["tail"][-1500:].replace("\n", "\n            "))
PY
}

# /v1/models of the service, every second, with what current points at and the service's pid, until
# watch_stop: the proofs beside the service must not make it miss one.
watch_start() {
  rm -f /tmp/fleetctl-watch-stop
  ( while [ ! -e /tmp/fleetctl-watch-stop ]; do
      code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 localhost:8000/v1/models)
      echo "$(date +%T) $code $(readlink /opt/fleetctl/current | sed 's|.*/||') $(head -n 1 /opt/fleetctl/service.pid 2>/dev/null)"
      sleep 1
    done ) > "$out/watch-$1.log" 2>&1 &
  watcher=$!
}
watch_stop() {
  touch /tmp/fleetctl-watch-stop; wait "$watcher"; rm -f /tmp/fleetctl-watch-stop
  python3 - "$out/watch-$1.log" <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
bad = [r for r in rows if len(r) < 2 or r[1] != "200"]
print(f"watch {sys.argv[1].rsplit('/', 1)[-1]}: {len(rows)} asks of /v1/models, {len(bad)} not answered 200")
if bad:
    print(f"  first miss {' '.join(bad[0])}; last miss {' '.join(bad[-1])}")
    print(f"  current at the misses: {sorted({r[2] if len(r) > 2 else '?' for r in bad})}")
print(f"  current seen: {list(dict.fromkeys(r[2] for r in rows if len(r) > 2))}")
PY
}
# A wheelhouse for another stack id from the same wheels: hard links to /root/wheelhouse's files and
# its manifest's class retargeted at the stack INVENTORY resolves to (the class and its files unchanged).
rewheel() {  # NAME INVENTORY
  fleet plan "$2" --json > "$out/plan-$1.json" || return 1
  rm -rf "/root/wheelhouse-$1" && cp -al "$wheels" "/root/wheelhouse-$1" || return 1
  python3 - "$out/plan-$1.json" "/root/wheelhouse-$1/manifest.json" <<'PY'
import json, os, sys
stack = next(iter(json.load(open(sys.argv[1]))["hosts"].values()))["stack"]["id"]
manifest = json.load(open(sys.argv[2]))
for entry in manifest["classes"].values():
    entry["stack_id"] = stack
with open(sys.argv[2] + ".new", "w") as f:
    json.dump(manifest, f, indent=2)
os.replace(sys.argv[2] + ".new", sys.argv[2])  # a new file: the hard-linked original stays as it was
print(f"wheelhouse-{os.path.basename(os.path.dirname(sys.argv[2]))[11:]}: stack {stack}")
PY
}
# The GPU playbook with the install from wheelhouse NAME, and (optionally) another smoke model.
playbook() {  # NAME [SMOKE_MODEL]
  python3 - "$book" "/root/wheelhouse-$1" "$out/gpu-serve-$1.yml" "${2:-}" <<'PY'
import sys, yaml
plays = yaml.safe_load(open(sys.argv[1]))
for play in plays:
    play.setdefault("install", {})["wheelhouse"] = sys.argv[2]
    if sys.argv[4]:
        play.setdefault("smoke", {})["model"] = sys.argv[4]
yaml.safe_dump(plays, open(sys.argv[3], "w"), sort_keys=False)
PY
}
# A rollout's journal: the host's state, its steps, and what the failed gate left.
journal() {
  python3 - "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(f"rollout {j.get('run_id')}: {j.get('status')}")
for name, h in j.get("hosts", {}).items():
    print(f"{name}: {h.get('state')} {h.get('from')} -> {h.get('to')} {h.get('error') or ''}")
    for key in ("rollback", "serving_again", "current", "proof_mode", "downtime_s"):
        if key in h:
            print(f"  {key}: {h[key]}")
    for s in (h.get("run") or {}).get("steps", []):
        print(f"  {s['name']:9} {s['status']:8} {s['duration']:7.1f}s  {s['detail'][:200]}")
        if s["status"] == "failed" and s.get("tail"):
            print("            " + s["tail"][-1200:].replace("\n", "\n            "))
for name, h in j.get("left_alone", {}).items():
    print(f"left alone {name}: {h}")
PY
}

case "${1:-}" in
health)
  # Needs no wheelhouse: the GPU's health through NVML, the same facts in `facts --json`, and the
  # nvidia-smi answers the probe falls back to, for comparison (issue 27).
  stamp "health"; fleet health "$inv" --json > "$out/health.json"; echo "rc=$?"
  fleet health "$inv" --format prometheus > "$out/health.prom"; echo "rc=$?"
  fleet health "$inv"; echo "rc=$?"
  stamp "facts"; fleet facts "$inv" --json > "$out/facts.json"; echo "rc=$?"
  python3 -c "import json; h=json.load(open('$out/health.json'))['hosts']; print({n: (v['status'], v.get('summary')) for n, v in h.items()})"
  nvidia-smi --query-gpu="$(python3 -c 'from fleetctl.facts.probe import HEALTH_FIELDS; print(HEALTH_FIELDS)')" --format=csv \
    > "$out/health-query.csv" 2>&1; echo "nvidia-smi rc=$?"; cat "$out/health-query.csv"
  nvidia-smi nvlink -s > "$out/nvlink-s.txt" 2>&1
  ;;
join)
  stamp "join"
  want=$(cat /root/store/SHA256)
  have=$(cat /root/store/part-* | sha256sum | cut -d' ' -f1)
  [ "$want" = "$have" ] || { echo "sha256 mismatch: $have, expected $want"; exit 1; }
  rm -rf "$wheels" && mkdir -p "$wheels" && cat /root/store/part-* | tar -C "$wheels" -xf - && rm -f /root/store/part-*
  ls "$wheels" | wc -l; du -sh "$wheels"
  ;;
serve)
  stamp "facts"; fleet facts "$inv" --json > "$out/facts.json"; echo "rc=$?"
  stamp "plan"; fleet plan "$inv" > "$out/plan.txt" 2>&1; echo "rc=$?"; cat "$out/plan.txt"
  stamp "provision"
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" -T 1800 --json > "$out/provision-1.json"
  echo "rc=$?"; figures "$out/provision-1.json"
  cp /opt/fleetctl/service/server.log "$out/service-server.log" 2>/dev/null
  cp /opt/fleetctl/smoke/server.log "$out/smoke-server.log" 2>/dev/null
  ;;
classcache)
  stamp "the class cache serve kept, on the controller"
  ls -la "${XDG_DATA_HOME:-$HOME/.local/share}/fleetctl/class-caches/" > "$out/class-caches.txt" 2>&1
  cat "$out/class-caches.txt"; cat "${XDG_DATA_HOME:-$HOME/.local/share}"/fleetctl/class-caches/*.json
  stamp "a second host of the class: no caches of its own, nothing serving"
  env=$(readlink -f /opt/fleetctl/current)
  du -sh "$env/cache" "$HOME/.cache/flashinfer" "$HOME/.cache/vllm" 2>/dev/null
  rm -rf "$env/cache" "$HOME/.cache/flashinfer" "$HOME/.cache/vllm"
  python3 - "$(cat /opt/fleetctl/service.pid)" <<'PY'
import os, signal, sys, time
pid = int(sys.argv[1])
os.killpg(pid, signal.SIGTERM)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # until the process is gone, not only its port
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
PY
  stamp "provision --revalidate: the class cache pushed before validate"
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" --revalidate -T 1800 --json > "$out/provision-cache.json"
  echo "rc=$?"; figures "$out/provision-cache.json"
  python3 -c "import json,sys; print(open(sys.argv[1]).read())" "$env/cache/fleetctl-cache.json"
  cp /opt/fleetctl/smoke/server.log "$out/smoke-server-cached.log" 2>/dev/null
  cp /opt/fleetctl/service/server.log "$out/service-server-cached.log" 2>/dev/null
  ;;
again)
  stamp "provision again"
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" -T 1800 --json > "$out/provision-2.json"
  echo "rc=$?"; figures "$out/provision-2.json"
  stamp "warm restart: stop the service, provision starts it again"
  # The service leads its own process group; dash's kill cannot signal a group ("Illegal number").
  python3 - "$(cat /opt/fleetctl/service.pid)" <<'PY'
import os, signal, sys, time
pid = int(sys.argv[1])
os.killpg(pid, signal.SIGTERM)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
PY
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" -T 1800 --json > "$out/provision-3.json"
  echo "rc=$?"; figures "$out/provision-3.json"
  stamp "plan --write-lock, audit --validate"
  fleet plan "$inv" --write-lock "$out/fleet.lock" > /dev/null; echo "rc=$?"
  fleet audit "$inv" --lock "$out/fleet.lock" --validate --format json -T 300 > "$out/audit.json"; echo "audit rc=$?"
  python3 -c "import json,sys; a=json.load(open(sys.argv[1])); print(json.dumps(a)[:1500])" "$out/audit.json"
  curl -s localhost:8000/v1/models | head -c 300; echo
  ;;
beside)
  stamp "the GPU's memory with the service serving, and who holds it"
  nvidia-smi --query-gpu=index,uuid,memory.total,memory.used,memory.free --format=csv > "$out/gpu-memory.csv" 2>&1
  nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv > "$out/compute-apps.csv" 2>&1
  nvidia-smi > "$out/nvidia-smi-serving.txt" 2>&1
  /opt/fleetctl/current/bin/python - > "$out/nvml-apps.json" 2>&1 <<'PY'
import json, pynvml as nv
nv.nvmlInit()
out = []
for i in range(nv.nvmlDeviceGetCount()):
    h = nv.nvmlDeviceGetHandleByIndex(i)
    m = nv.nvmlDeviceGetMemoryInfo(h)
    out.append({"index": i, "total": m.total, "used": m.used, "free": m.free,
                "apps": [{"pid": p.pid, "used": p.usedGpuMemory} for p in nv.nvmlDeviceGetComputeRunningProcesses(h)]})
print(json.dumps(out))
PY
  { echo "service.pid $(cat /opt/fleetctl/service.pid 2>/dev/null)"; ps -eo pid,pgid,rss,args | grep -v ' ps ' | cut -c1-200; } \
    > "$out/processes.txt" 2>&1
  cat "$out/gpu-memory.csv" "$out/compute-apps.csv" "$out/nvml-apps.json"
  fleet facts "$inv" --json > "$out/facts-serving.json"; echo "facts rc=$?"
  fleet plan "$inv" > "$out/plan-serving.txt" 2>&1; echo "plan rc=$?"
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" --check > "$out/check-serving.txt" 2>&1
  echo "provision --check rc=$?"; grep -i "proof\|validate\|smoke" "$out/check-serving.txt" | head -20

  stamp "provision --revalidate beside the service"
  watch_start revalidate
  fleet provision "$inv" --playbook "$book" --wheelhouse "$wheels" -T 1800 --revalidate --json > "$out/revalidate.json"
  echo "rc=$?"; watch_stop revalidate; figures "$out/revalidate.json"
  cp /opt/fleetctl/smoke/server.log "$out/revalidate-smoke-server.log" 2>/dev/null

  stamp "rollout to another stack id (tests/gpu/gpu-test-host-b.yml), its gate beside the old stack"
  rewheel b tests/gpu/gpu-test-host-b.yml && playbook b
  watch_start rollout-b
  fleet rollout tests/gpu/gpu-test-host-b.yml --playbook "$out/gpu-serve-b.yml" -T 1800 --json > "$out/rollout-b.json"
  echo "rc=$?"; watch_stop rollout-b; journal "$out/rollout-b.json"
  cp /opt/fleetctl/smoke/server.log "$out/rollout-b-smoke-server.log" 2>/dev/null
  cp /opt/fleetctl/service/server.log "$out/rollout-b-service-server.log" 2>/dev/null
  curl -s localhost:8000/v1/models | head -c 300; echo
  ;;
gatefail)
  stamp "rollout (tests/gpu/gpu-test-host-c.yml) whose gate fails: its smoke test asks for a model that is not there"
  rewheel c tests/gpu/gpu-test-host-c.yml && playbook c /nonexistent/model
  before=$(readlink /opt/fleetctl/current); echo "current before: $before"
  watch_start rollout-c
  fleet rollout tests/gpu/gpu-test-host-c.yml --playbook "$out/gpu-serve-c.yml" -T 1800 --json > "$out/rollout-c.json"
  echo "rc=$? (a failed gate: 1 expected)"; watch_stop rollout-c; journal "$out/rollout-c.json"
  after=$(readlink /opt/fleetctl/current); echo "current after: $after"
  [ "$before" = "$after" ] && echo "current unchanged: PASS" || echo "current moved: FAIL"
  cp /opt/fleetctl/smoke/server.log "$out/rollout-c-smoke-server.log" 2>/dev/null
  curl -s localhost:8000/v1/models | head -c 300; echo
  ;;
exclusive)
  stamp "provision --revalidate, fleet_proof_mode: exclusive: the service stops for the proofs"
  [ -d /root/wheelhouse-b ] || rewheel b tests/gpu/gpu-test-host-b-exclusive.yml  # straight after serve
  playbook b
  fleet provision tests/gpu/gpu-test-host-b-exclusive.yml --playbook "$out/gpu-serve-b.yml" --check \
    > "$out/check-exclusive.txt" 2>&1; echo "provision --check rc=$?"; grep -i "proof\|vacate\|stop" "$out/check-exclusive.txt" | head
  watch_start exclusive
  fleet provision tests/gpu/gpu-test-host-b-exclusive.yml --playbook "$out/gpu-serve-b.yml" -T 1800 --revalidate \
    --json > "$out/exclusive.json"
  echo "rc=$?"; watch_stop exclusive; figures "$out/exclusive.json"
  cp /opt/fleetctl/smoke/server.log "$out/exclusive-smoke-server.log" 2>/dev/null
  curl -s localhost:8000/v1/models | head -c 300; echo
  ;;
model)
  # The smoke's tiny Llama where serve ran; else (straight after join) the same model written by smoke.py
  # with the image's tokenizers: either way a model of the controller's store, tiny-llama@gpu-proof.
  tiny=/opt/fleetctl/smoke/tiny-llama
  if [ ! -f "$tiny/model.safetensors" ]; then
    tiny=/root/tiny-llama
    for py in /opt/torch/.venv/bin/python python3; do "$py" -c "import tokenizers" 2>/dev/null && break; done
    "$py" -c "import sys; from pathlib import Path; from fleetctl.remote import smoke; smoke.generate_model(Path(sys.argv[1]))" "$tiny"
    echo "tiny Llama written by smoke.py with $py: rc=$?"
  fi
  stamp "weights pull $tiny"
  fleet weights pull "$tiny@gpu-proof" --json > "$out/pull.json"; echo "rc=$?"; head -c 300 "$out/pull.json"; echo
  m=tests/gpu/gpu-test-host-model.yml
  stamp "provision --check, then provision: the model staged, then served from the staged copy"
  fleet provision "$m" --playbook "$book" --wheelhouse "$wheels" --check > "$out/check-model.txt" 2>&1
  echo "rc=$?"; grep -i "model" "$out/check-model.txt" | head -8
  fleet provision "$m" --playbook "$book" --wheelhouse "$wheels" -T 1800 --json > "$out/provision-model.json"
  echo "rc=$?"; figures "$out/provision-model.json"
  curl -s localhost:8000/v1/models > "$out/v1-models.json"; head -c 300 "$out/v1-models.json"; echo
  cp /opt/fleetctl/smoke/server.log "$out/smoke-server.log" 2>/dev/null
  cp /opt/fleetctl/service/server.log "$out/service-server-model.log" 2>/dev/null
  ;;
mend)
  m=tests/gpu/gpu-test-host-model.yml
  stamp "a byte flipped in the staged copy: audit names the file, provision sends it again"
  python3 - <<'PY'
path = "/opt/fleetctl/models/tiny-llama@gpu-proof/model.safetensors"
with open(path, "r+b") as f:
    f.seek(4096); b = f.read(1); f.seek(4096); f.write(bytes([b[0] ^ 0xFF]))
PY
  fleet audit "$m" --json > "$out/audit-model.json"; echo "audit rc=$?"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print([x for h in d['hosts'].values() for x in h.get('drift', []) if x.get('kind') == 'model'])" "$out/audit-model.json"
  fleet provision "$m" --playbook "$book" --wheelhouse "$wheels" -T 1800 --json > "$out/provision-mend.json"
  echo "rc=$?"; figures "$out/provision-mend.json"
  curl -s localhost:8000/v1/models | head -c 300; echo
  ;;
*)
  echo "usage: tests/gpu/prove.sh health|join|serve|again|beside|gatefail|exclusive|classcache|model|mend" >&2; exit 2 ;;
esac

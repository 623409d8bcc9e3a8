#!/bin/sh
# The GPU proof, run on the GPU test host from the repository root (tests/gpu/README.md says how
# the wheelhouse gets there). Phases, each well inside one device call's 10 minutes:
#   join    — join the carried pieces in /root/store, check their sha256, unpack the wheelhouse
#   serve   — facts, plan, then `fleetctl provision` serving vLLM from the image's torch
#   again   — a second provision (changes nothing), a warm restart of the service,
#             plan --write-lock and audit --validate
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
    for s in host.get("steps", []):
        keep = {k: v for k, v in (s.get("data") or {}).items() if k in (
            "time_to_healthy_s", "ttft_s", "completion_tokens", "observed", "gpus", "tensor_parallel_size")}
        print(f"  {s['name']:9} {s['status']:8} {s['duration']:7.1f}s  {s['detail'][:160]}")
        if keep:
            print(f"            {json.dumps(keep)[:600]}")
        if s["status"] == "failed" and s.get("tail"):
            print("            " + s["tail"][-1500:].replace("\n", "\n            "))
PY
}

case "${1:-}" in
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
*)
  echo "usage: tests/gpu/prove.sh join|serve|again" >&2; exit 2 ;;
esac

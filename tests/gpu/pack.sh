#!/bin/sh
# On a machine that reaches the package index: build the GPU test host's wheelhouse with
# `fleetctl wheelhouse` from that host's recorded facts, and cut it into pieces small enough
# for one transfer each (the device tool carries 64 MiB a call).
#   tests/gpu/pack.sh [FACTS_JSON]      → .wheelhouse-gpu/ and .gpu-pieces/part-NN + SHA256
set -eu
cd "$(dirname "$0")/../.."
facts=${1:-tests/gpu/gpu-test-host.facts.json}
.venv/bin/fleetctl wheelhouse inventories/gpu-test-host.yml .wheelhouse-gpu \
  --playbook playbooks/gpu-serve.yml --facts "$facts"
rm -rf .gpu-pieces && mkdir .gpu-pieces
tar -C .wheelhouse-gpu -cf - . | split -b 60M -d - .gpu-pieces/part-
(cd .gpu-pieces && cat part-* | sha256sum | cut -d' ' -f1 > SHA256)
ls -l .gpu-pieces

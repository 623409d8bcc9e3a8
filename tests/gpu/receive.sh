#!/bin/sh
# On the GPU test host: keep the pieces this call carried (.gpu-pieces/part-NN) in /root/store,
# outside the working tree, where they stay while the machine does.
set -eu
cd "$(dirname "$0")/../.."
mkdir -p /root/store
for piece in .gpu-pieces/part-*; do [ -f "$piece" ] && mv "$piece" /root/store/; done
cp .gpu-pieces/SHA256 /root/store/ 2>/dev/null || true
ls -l /root/store

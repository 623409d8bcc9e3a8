#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with fleetctl installed.
# --test also installs what the test suite needs: openssh-server for the lab's real sshd hosts,
# docker.io, debootstrap and docker-compose for container mode's real engine (tests/engine.py
# starts dockerd and makes the base image), and the test extras (pytest, ansible-core to compare
# inventories with, prometheus-client).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "--test" ]; then
  has() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
  need=""
  has sshd || need="$need openssh-server"
  has dockerd || need="$need docker.io"
  has debootstrap || need="$need debootstrap"
  has docker-compose || docker compose version >/dev/null 2>&1 || need="$need docker-compose"
  if [ -n "$need" ] && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086  # a list of package names
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  elif [ -n "$need" ]; then
    echo "bootstrap: the tests need$need (sudo apt-get install$need)" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import fleetctl" 

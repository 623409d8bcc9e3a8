#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with fleetctl installed.
# --test also installs what the test suite needs: openssh-server for the lab's real sshd hosts,
# and the test extras (pytest, ansible-core to compare inventories with, prometheus-client).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "--test" ] && ! [ -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  else
    echo "bootstrap: the test lab needs openssh-server (sudo apt-get install openssh-server)" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import fleetctl" 

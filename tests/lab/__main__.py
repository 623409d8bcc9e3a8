"""Start or stop the lab by hand, for trying fleetctl against real sshd hosts:

    python -m tests.lab up      # starts one host per hardware profile, writes inventories/lab.yml
    fleetctl facts inventories/lab.yml
    python -m tests.lab down

Needs root (sshd, namespaces) and openssh-server. State lives in .lab/ (git-ignored).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.conftest import FLEET
from tests.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".lab"
INVENTORY = ROOT / "inventories" / "lab.yml"


def up() -> None:
    down()
    lab = Lab(STATE, net=77)
    for name, (hardware, os_release) in FLEET.items():
        lab.add(name, hardware, os_release=os_release)
    lab.start()
    groups = {"gpu": [n for n, (hw, _) in FLEET.items() if hw], "cpu": [n for n, (hw, _) in FLEET.items() if not hw]}
    lab.write_inventory(INVENTORY, groups)
    # Paths relative to the repository root, where fleetctl is run from, so the file can be committed.
    INVENTORY.write_text("# Written by `python -m tests.lab up`; run fleetctl from the repository root.\n"
                         + INVENTORY.read_text().replace(f"{ROOT}/", ""))
    print(f"{len(lab.hosts)} lab hosts up on 127.77.0.x:2222; inventory: {INVENTORY.relative_to(ROOT)}")


def down() -> None:
    # Each host's reboot watcher first, so that no reboot brings its sshd back meanwhile.
    for pgid in [*STATE.glob("hosts/*/watcher.pid"), *STATE.glob("hosts/*/lab.pgid")]:
        try:
            os.killpg(int(pgid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
        pgid.unlink()


if __name__ == "__main__":
    {"up": up, "down": down}.get(sys.argv[1] if len(sys.argv) > 1 else "", lambda: sys.exit(__doc__))()

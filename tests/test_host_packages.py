"""Facts of the host packages a stack may need (issue 23): the probe's ``host-packages`` section, its pure
parser on recorded sections, and the probe on a real Debian host (tests/lab/systemd.py) with a package
removed as a bare image lacks it."""

from __future__ import annotations

import pytest
import yaml

from fleetctl.facts.probe import HostPackages, parse_host_packages
from tests.conftest import fleetctl_json


@pytest.mark.parametrize("section, packages", [
    ("venv=yes\npython_headers=yes\ncxx=yes\nlibnuma=yes\nmanager=apt-get\n",
     HostPackages(True, True, True, True, "apt-get")),
    # Debian's cloud image: python3 without python3-venv or headers, no compiler, no libnuma
    ("venv=no\npython_headers=no\ncxx=no\nlibnuma=no\nmanager=apt-get\n", HostPackages(manager="apt-get")),
    ("venv=no\ncxx=no\nlibnuma=no\n", HostPackages()),  # no python3 at all, no package manager
    ("", None),  # facts recorded by an older probe
])
def test_the_section_parses(section, packages):
    assert parse_host_packages(section) == packages


def test_a_real_host_without_python3_venv_says_so(systemd_host, tmp_path):
    inventory = tmp_path / "inv.yml"
    inventory.write_text(yaml.safe_dump(systemd_host.lab.inventory([systemd_host], user="fleet")))
    code, out = fleetctl_json("facts", inventory)
    assert code == 0, out
    assert out["hosts"][systemd_host.name]["facts"]["host_packages"] == {
        "venv": True, "python_headers": True, "cxx": True, "libnuma": True, "manager": "apt-get"}
    removed = systemd_host.root("dpkg -r --force-depends $(dpkg-query -W -f '${Package}\\n' 'python3*-venv' 'g++*' "
                                "libnuma1) >/dev/null 2>&1; dpkg -l 'python3*-venv' 'g++*' libnuma1 2>/dev/null "
                                "| grep -c '^ii'")
    assert removed.stdout.strip() == "0", removed.stdout + removed.stderr
    code, out = fleetctl_json("facts", inventory)
    packages = out["hosts"][systemd_host.name]["facts"]["host_packages"]
    assert (packages["venv"], packages["libnuma"], packages["cxx"]) == (False, False, False)

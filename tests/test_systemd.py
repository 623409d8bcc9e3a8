"""The one quoting rule for a word on a systemd command line, read back as systemd reads it
(systemd.syntax(7)) and checked by systemd-analyze where it is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fleetctl import systemd
from tests.conftest import exec_words

# A path with a space, both quotes, a specifier, a variable, a backslash, a tab and a newline.
AWKWARD = "/srv/my fleet/it's \"the\" 100%n ${HOME} \\x\tend\nsecond line/inventory.yml"


def test_a_word_comes_back_unchanged():
    quoted = systemd.quote(AWKWARD)
    assert "\n" not in quoted and "\t" not in quoted, "a raw newline would end the setting"
    assert "%%n" in quoted and "$${HOME}" in quoted, "specifiers and variables are disarmed"
    assert exec_words(f"/bin/echo {quoted} {systemd.quote('plain')}") == ["/bin/echo", AWKWARD, "plain"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_quoted_word(tmp_path):
    unit = tmp_path / "awkward.service"
    unit.write_text(f"[Service]\nType=oneshot\nExecStart=/bin/true {systemd.quote(AWKWARD)}\n")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "awkward.service:" not in done.stderr, done.stderr  # a bad escape is a warning naming its line

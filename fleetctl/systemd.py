"""systemd unit files: the one quoting rule for a word fleetctl writes on a unit's command line.

A command line (``ExecStart=``) is no shell: systemd splits it into words itself, unquotes
``"…"`` with C escapes, and expands ``%`` specifiers and ``$VARIABLES`` even inside quotes
(systemd.syntax(7) "Quoting", systemd.service(5) "Command lines"). ``quote`` makes any text
one word that reaches the program unchanged; the audit's timer and container mode's unit both
write through it.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def quote(value) -> str:
    """One command-line word: quoted whole, backslashes and quotes escaped, ``%%`` and ``$$`` for a
    literal ``%`` and ``$``, and control characters (a newline would end the setting) as C escapes."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return '"' + _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) + '"'

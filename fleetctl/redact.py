"""Secrets out of everything fleetctl writes or shows: credentials in URLs.

An index URL may carry a credential (``fleet_torch_index: https://user:TOKEN@mirror/simple``,
a ``?token=…`` query). :func:`redact` turns any text into one where every such credential reads
``***`` (``https://user:***@mirror/simple``); :func:`redact_data` does it to every string in a
JSON-like value. They are applied where values become data (a Stack's dict, a resolution's
reasons, an action's command, a failed command's output) and again where data becomes a file
(fleet.lock, run records, journals). On a host the credential reaches pip or uv only through a
0600 file written from the install's stdin (see :data:`fleetctl.apply.steps.INSTALL`), never argv.

Secrets that are not URLs — a become password, a value decrypted from a vault — are registered once
(:func:`register_secret`) when fleetctl reads them; from then on :func:`redact` masks each of them
wherever it appears in a text.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host or scheme://token@host: the userinfo part of a URL.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")
# ?token=… / &api_key=…: query values whose names say they are secrets.
_QUERY = re.compile(r"(?P<name>[?&](?:[a-z0-9_.-]*(?:token|key|secret|password|passwd|pwd|auth|signature|sig|"
                    r"credential)[a-z0-9_.-]*))=(?P<value>[^&#\s'\"]+)", re.IGNORECASE)


# Registered secrets (a process-wide set: a secret read anywhere must be masked everywhere), longest
# first so that a secret holding another is masked whole.
_SECRETS: list[str] = []
MIN_SECRET = 4  # shorter values (a vaulted "22", "true") would mask ordinary text


def register_secret(value: str) -> None:
    """Mask *value* in every later :func:`redact` (each line of a multi-line one, too)."""
    for part in {value.strip(), *value.strip().splitlines()}:
        part = part.strip()
        if len(part) >= MIN_SECRET and part not in _SECRETS:
            _SECRETS.append(part)
    _SECRETS.sort(key=len, reverse=True)


def _userinfo(m: re.Match) -> str:
    user, sep, _ = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"


def redact(text: str) -> str:
    """*text* with every URL credential replaced by ``***`` (idempotent)."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(lambda m: f"{m['name']}={MASK}", _USERINFO.sub(_userinfo, text))


def redact_data(value):
    """A JSON-like value (dicts, lists, tuples, strings) with :func:`redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value

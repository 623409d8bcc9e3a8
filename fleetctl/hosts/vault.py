"""Ansible Vault: encrypted vars files and ``!vault`` values, decrypted as Ansible decrypts them.

The format (format 1.1/1.2, cipher AES256), as ansible-core's ``parsing/vault`` writes it: a header line
``$ANSIBLE_VAULT;1.1;AES256`` (1.2 adds ``;LABEL``, the vault id), then hex text (wrapped at 80) of
``hex(salt) \\n hex(hmac) \\n hex(ciphertext)``. The keys: PBKDF2-HMAC-SHA256 of the password with the
salt, 10,000 iterations, 80 bytes: the AES-256 key, the HMAC-SHA256 key, the CTR counter block. The HMAC
covers the ciphertext; the plaintext is PKCS#7-padded (128-bit blocks). Every primitive is the
``cryptography`` package's (paramiko's own dependency): nothing here is hand-written crypto.

Passwords come from ``--vault-password-file FILE`` (its content, stripped; an executable file is run and its
output used, as Ansible's script password files), ``--vault-id [LABEL@]FILE``, or
``ANSIBLE_VAULT_PASSWORD_FILE``. As Ansible, a secret whose label matches the header's vault id is tried
first, then every other. The inventory registers every decrypted value with :mod:`fleetctl.redact`
(inventory.VaultText), so it reads ``***`` wherever fleetctl prints or writes text.
"""

from __future__ import annotations

import binascii
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import FleetError
from fleetctl.redact import register_secret

HEADER = "$ANSIBLE_VAULT"
ITERATIONS = 10000
KEY_BYTES, IV_BYTES = 32, 16


class VaultError(FleetError):
    """A vault cannot be opened: no password given, none fits, a file that is not a vault."""


@dataclass(frozen=True)
class Secret:
    """One vault password and its vault id label (``default`` where none was named)."""

    label: str
    password: bytes = field(repr=False)


@dataclass(frozen=True)
class Vault:
    """The passwords a run was given, in the order given."""

    secrets: tuple[Secret, ...] = ()

    def decrypt(self, text: str, where: str) -> str:
        """The plaintext of vault *text*; VaultError naming *where* when no password opens it."""
        label, payload = parse(text, where)
        if not self.secrets:
            raise VaultError(f"{where}: encrypted with ansible-vault and no vault password was given",
                             fix="pass --vault-password-file FILE or --vault-id, or set ANSIBLE_VAULT_PASSWORD_FILE")
        ordered = sorted(self.secrets, key=lambda s: s.label != label)
        for secret in ordered:
            plain = decrypt_payload(payload, secret.password)
            if plain is not None:
                return plain.decode("utf-8", errors="surrogateescape")
        raise VaultError(f"{where}: no vault password given decrypts it"
                         + (f" (vault id {label})" if label else ""), fix="check the vault password file or --vault-id")


def is_vault(text: str) -> bool:
    return text.lstrip().startswith(HEADER)


def parse(text: str, where: str) -> tuple[str | None, tuple[bytes, bytes, bytes]]:
    """The header's vault id (or None) and the (salt, hmac, ciphertext) of a vault text."""
    lines = [line.strip() for line in text.strip().splitlines()]
    header = lines[0].split(";") if lines else []
    if len(header) < 3 or header[0] != HEADER or header[1] not in ("1.1", "1.2") or header[2] != "AES256":
        raise VaultError(f"{where}: not an ansible-vault text this fleetctl reads (want {HEADER};1.1 or 1.2;AES256)")
    try:
        inner = binascii.unhexlify("".join(lines[1:])).decode("ascii")
        salt, mac, ciphertext = (binascii.unhexlify(part) for part in inner.split("\n"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise VaultError(f"{where}: the vault text is damaged (not hex in Ansible's layout)") from None
    return (header[3] if len(header) > 3 else None), (salt, mac, ciphertext)


def decrypt_payload(payload: tuple[bytes, bytes, bytes], password: bytes) -> bytes | None:
    """The plaintext, or None where the HMAC says this password is not the one (constant-time compare)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, hmac, padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    salt, mac, ciphertext = payload
    derived = PBKDF2HMAC(hashes.SHA256(), 2 * KEY_BYTES + IV_BYTES, salt, ITERATIONS).derive(password)
    aes_key, mac_key, counter = derived[:KEY_BYTES], derived[KEY_BYTES:2 * KEY_BYTES], derived[2 * KEY_BYTES:]
    check = hmac.HMAC(mac_key, hashes.SHA256())
    check.update(ciphertext)
    try:
        check.verify(mac)
    except InvalidSignature:
        return None
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(counter)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None


def load_vault(password_files: list[str] = (), vault_ids: list[str] = (), env: dict | None = None) -> Vault:
    """The run's vault passwords: each ``--vault-id [LABEL@]FILE``, each ``--vault-password-file``, then
    ``ANSIBLE_VAULT_PASSWORD_FILE`` (as Ansible, the variable counts only where no option named a file)."""
    env = os.environ if env is None else env
    sources = [tuple(v.split("@", 1)) if "@" in v else ("default", v) for v in vault_ids]
    sources += [("default", f) for f in password_files]
    if not sources and env.get("ANSIBLE_VAULT_PASSWORD_FILE"):
        sources.append(("default", env["ANSIBLE_VAULT_PASSWORD_FILE"]))
    return Vault(tuple(Secret(label, read_password(source)) for label, source in sources))


def read_password(source: str) -> bytes:
    """A password file's first line, or an executable's output (stripped, as Ansible strips it)."""
    if source == "prompt":
        raise VaultError("--vault-id prompt: fleetctl reads vault passwords from files only",
                         fix="put the password in a file (mode 0600) and pass --vault-password-file FILE")
    path = Path(os.path.expanduser(source))
    try:
        if os.access(path, os.X_OK) and path.is_file():
            done = subprocess.run([str(path)], capture_output=True, timeout=60)
            if done.returncode != 0:
                raise VaultError(f"vault password script {path} exited {done.returncode}")
            data = done.stdout
        else:
            data = path.read_bytes()
    except OSError as exc:
        raise VaultError(f"cannot read the vault password file {path}: {exc.strerror or exc}") from None
    password = data.strip()
    if not password:
        raise VaultError(f"the vault password file {path} is empty")
    register_secret(password.decode("utf-8", errors="replace"))
    return password

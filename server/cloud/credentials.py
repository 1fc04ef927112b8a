"""Per-device credentials: one secret per device id, kept only as a salted HMAC-SHA256, re-read on change.

A credential is `<device_id>:<secret>` (`fairedge.common.device_token`), the secret 32 random bytes from
`secrets`. The file (`<state_dir>/credentials.json` by default, JSON, mode 0600) holds per device a random
salt, HMAC-SHA256(salt, credential) and when it was issued, never the secret:

    {"format": "fairedge-device-credentials/1",
     "devices": {"cam-1": {"salt": "<32 hex>", "hmac_sha256": "<64 hex>", "issued_at": "..."}}}

Why a fast MAC and not a slow password hash (scrypt): the secrets are 256 random bits, which nobody can
guess, so stretching buys nothing and would cost tens of milliseconds of CPU on every call. The salt
keeps equal secrets from having equal hashes; the device id inside the MAC binds an entry to its id
(copied under another id it matches nothing). Comparisons use `hmac.compare_digest`, and an unknown id
is checked against a dummy entry, so timing tells nothing about ids or secrets.

Issue and revoke without a restart: writers replace the file atomically (under an flock on
`<file>.lock`, so two commands cannot lose each other's change); `verify` stats the file on each call
and re-reads it when it changed. A missing file holds no credentials; a malformed one is reported
and the last good one stays in force.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fairedge.common.atomic_files import atomic_write_json
from fairedge.common.device_token import join_token, split_token
from fairedge.server.cloud.validation import check_device_id

log = logging.getLogger("fairedge.cloud")

FORMAT = "fairedge-device-credentials/1"
_DUMMY_SALT = bytes(16)
_DUMMY_MAC = bytes(32)


@dataclass(frozen=True)
class Credential:
    """What the file keeps of one device's credential."""

    salt: bytes
    mac: bytes
    issued_at: str


def _mac(salt: bytes, token: str) -> bytes:
    return hmac.new(salt, token.encode(), hashlib.sha256).digest()


class CredentialStore:
    """The credentials file of a cloud service: `verify` on every call, `issue` / `revoke` by the operator."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._entries: dict[str, Credential] = {}

    # ----- reading (every call) -----

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def entries(self) -> dict[str, Credential]:
        """The credentials now in force (the file is re-read when it changed since the last look)."""
        signature = self._stat()
        with self._lock:
            if signature != self._signature:
                self._signature = signature
                if signature is None:
                    if self._entries:
                        log.warning("credentials file %s is gone: every call is refused", self.path)
                    self._entries = {}
                else:
                    try:
                        self._entries = _read(self.path)
                    except (OSError, ValueError) as err:
                        log.error(
                            "credentials file %s not reloaded, the previous one stays in force: %s", self.path, err
                        )
            return self._entries

    def verify(self, token: str) -> str | None:
        """The device id `token` is a valid credential for, or None (malformed, unknown, revoked, wrong secret)."""
        try:
            device_id, _ = split_token(token)
        except ValueError:
            return None
        entry = self.entries().get(device_id)
        salt, expected = (entry.salt, entry.mac) if entry is not None else (_DUMMY_SALT, _DUMMY_MAC)
        ok = hmac.compare_digest(_mac(salt, token.strip()), expected)
        return device_id if ok and entry is not None else None

    # ----- writing (the operator's command) -----

    def issue(self, device_id: str, *, replace: bool = False) -> str:
        """A new credential for `device_id` (returned once, never stored); `replace` rotates an existing one."""
        check_device_id(device_id)
        token = join_token(device_id, secrets.token_urlsafe(32))
        salt = secrets.token_bytes(16)
        entry = Credential(salt, _mac(salt, token), time.strftime("%Y-%m-%dT%H:%M:%S%z"))

        def add(entries: dict[str, Credential]) -> None:
            if device_id in entries and not replace:
                raise ValueError(
                    f"device {device_id!r} already has a credential (issued {entries[device_id].issued_at}); "
                    "rotate it with --replace (the old one stops working) or revoke it first"
                )
            entries[device_id] = entry

        self._update(add)
        return token

    def revoke(self, device_id: str) -> None:
        """Remove `device_id`'s credential; its calls are refused from the next one on. KeyError if it has none."""

        def remove(entries: dict[str, Credential]) -> None:
            if entries.pop(device_id, None) is None:
                raise KeyError(f"device {device_id!r} has no credential in {self.path}")

        self._update(remove)

    def _update(self, change: Callable[[dict[str, Credential]], None]) -> None:
        with self._file_lock():
            entries = _read(self.path) if self.path.is_file() else {}
            change(entries)
            atomic_write_json(self.path, _document(entries))  # a new file from mkstemp: mode 0600

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _document(entries: dict[str, Credential]) -> dict:
    return {
        "format": FORMAT,
        "devices": {
            d: {"salt": e.salt.hex(), "hmac_sha256": e.mac.hex(), "issued_at": e.issued_at}
            for d, e in sorted(entries.items())
        },
    }


def _read(path: Path) -> dict[str, Credential]:
    """The entries of a credentials file; ValueError naming the problem if it is not one."""
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("devices"), dict):
        raise ValueError(f"{path} is not a credentials file (format {FORMAT!r} with a 'devices' table)")
    entries = {}
    for device_id, e in doc["devices"].items():
        try:
            entries[device_id] = Credential(bytes.fromhex(e["salt"]), bytes.fromhex(e["hmac_sha256"]), e["issued_at"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: the entry of device {device_id!r} needs hex 'salt', 'hmac_sha256' and 'issued_at'"
            ) from None
        if len(entries[device_id].mac) != 32:
            raise ValueError(f"{path}: the hmac_sha256 of device {device_id!r} is not 32 bytes")
    return entries

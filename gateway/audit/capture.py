"""Payload capture: what of a call's bytes the audit trail keeps.

Modes, per team (`audit.capture`, `audit.capture_teams`):

- `none`: no trace of the bytes, not even their hashes.
- `hash` (default): SHA-256 of the request and of the response, in the chained record.
- `encrypted`: the hashes, plus both payloads under AES-256-GCM in
  `audit_payloads`. Each ciphertext names its keyring key; a new key becomes
  active by `bastion audit keyring rotate` and old rows stay readable under
  the old key. The request id and part are the associated data, so a
  ciphertext moved to another call does not decrypt. After decryption the
  plaintext is checked against the chained record's SHA-256 as well.

The keyring is a JSON file (0600) holding raw keys in base64: keep it off the
database host; whoever holds it and the database can read captured prompts.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.secret_files import locked, replace_file

Mode = Literal["none", "hash", "encrypted"]
Part = Literal["request", "response"]


class KeyringError(Exception):
    """The keyring is missing, unreadable, malformed or lacks a key."""


class RingKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: str  # base64 of 32 random bytes
    created_at: datetime


class Keyring(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    active: str
    keys: dict[str, RingKey]

    def raw(self, key_id: str) -> bytes:
        entry = self.keys.get(key_id)
        if entry is None:
            raise KeyringError(f"the keyring has no key {key_id!r}")
        raw = base64.b64decode(entry.key)
        if len(raw) != 32:
            raise KeyringError(f"keyring key {key_id!r} is not 32 bytes")
        return raw


def load_keyring(path: Path) -> Keyring:
    try:
        ring = msgspec.json.decode(path.read_bytes(), type=Keyring)
    except FileNotFoundError:
        raise KeyringError(
            f"payload keyring {path} not found (run `bastion init` or `bastion audit keyring rotate`)"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise KeyringError(f"cannot load payload keyring {path}: {exc}") from None
    ring.raw(ring.active)
    return ring


def rotate_keyring(path: Path) -> str:
    """Add a new key and make it active (creating the keyring if needed); return its id."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Read, add, write under a lock: of two rotations at once, neither may drop
    # the other's key, which may already seal payloads in a reloaded gateway.
    with locked(path):
        ring = load_keyring(path) if path.exists() else Keyring(active="", keys={})
        key_id = _new_key_id()
        while key_id in ring.keys:  # two rotations in one second may draw one suffix; never reuse an id
            key_id = _new_key_id()
        key = RingKey(base64.b64encode(secrets.token_bytes(32)).decode(), datetime.now(UTC))
        replace_file(path, msgspec.json.encode(Keyring(active=key_id, keys={**ring.keys, key_id: key})), mode=0o600)
    return key_id


def _new_key_id() -> str:
    return "k" + datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)


def _aad(request_id: str, part: str) -> bytes:
    return f"bastion-payload/v1:{request_id}:{part}".encode()


@dataclass(frozen=True)
class Sealer:
    """Encrypts captured payloads under the keyring's active key."""

    ring: Keyring
    max_bytes: int

    def seal(self, request_id: str, part: Part, data: bytes) -> dict[str, Any]:
        """One `audit_payloads` row."""
        truncated = len(data) > self.max_bytes
        data = data[: self.max_bytes]
        nonce = secrets.token_bytes(12)
        ciphertext = AESGCM(self.ring.raw(self.ring.active)).encrypt(nonce, data, _aad(request_id, part))
        return {
            "request_id": request_id,
            "part": part,
            "key_id": self.ring.active,
            "nonce": nonce,
            "ciphertext": ciphertext,
            "size": len(data),
            "truncated": truncated,
        }


def open_payload(ring: Keyring, row: Any) -> bytes:
    """Decrypt one `audit_payloads` row; KeyringError when it cannot be (wrong key, altered)."""
    try:
        return AESGCM(ring.raw(row.key_id)).decrypt(row.nonce, row.ciphertext, _aad(row.request_id, row.part))
    except InvalidTag:
        raise KeyringError(f"payload {row.request_id}/{row.part} does not decrypt: altered or wrong key") from None

"""Trusted Ed25519 public keys from the config, by key id."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.manifest import key_id_of, load_public_key
from gateway.audit.signing_keys import own_public_keys
from gateway.settings import ConfigError, Settings, TrustedKey


def load_trusted(settings: Settings, entries: Iterable[TrustedKey], what: str) -> dict[str, Ed25519PublicKey]:
    """Load each key; a configured key id must match the key it names."""
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        path = settings.path(entry.public_key)
        try:
            key = load_public_key(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what} {entry.key_id}: cannot load {path}: {exc}") from None
        if key_id_of(key) != entry.key_id:
            raise ConfigError(f"{what} {entry.key_id}: {path} has key id {key_id_of(key)}")
        keys[entry.key_id] = key
    return keys


def audit_verify_keys(settings: Settings) -> dict[str, Ed25519PublicKey]:
    """Keys trusted for audit checkpoints: `audit.trusted_keys`, else the signing
    key's own .pub and those of the keys it replaced (`signing_keys.own_public_keys`)."""
    if settings.audit.trusted_keys:
        return load_trusted(settings, settings.audit.trusted_keys, "audit key")
    try:
        return own_public_keys(settings.audit_signing_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the audit public keys of {settings.audit_signing_key}: {exc}") from None

"""The audit signing key, its rotation, and the public keys that verify the trail.

Checkpoints and prunes name the key that signed them, so a trail may hold
several. A rotation (`bastion audit signing-key rotate`: a policy's yearly
change, or a key that may have leaked) makes a new key and keeps the public
half of every key that has signed for this trail in `<key>.history/<key id>.pub`.
By default `audit verify` trusts those and the current `.pub`, so the records
signed before a rotation verify after it with no change to the config.

A leaked key is rotated all the same: its signatures stay trusted, since the
records it signed before the leak are genuine. What shows a forgery made with
it afterwards is the anchor file (kept where the database's administrators
cannot write) and the rotation's own record, which says from when the old key
should sign nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.manifest import key_id_of, load_private_key, load_public_key, pem_pair, public_key_path
from engine.secret_files import locked, replace_file


def history_folder(key_path: Path) -> Path:
    """Where the public keys of every key that has signed for this trail are kept."""
    return Path(str(key_path) + ".history")


def own_public_keys(key_path: Path) -> dict[str, Ed25519PublicKey]:
    """The current `.pub` and every key in the history, by key id.

    Raises OSError or ValueError for a key file that cannot be read: a history
    the verifier cannot read must not pass as a shorter one."""
    paths = [public_key_path(key_path)]
    folder = history_folder(key_path)
    if folder.is_dir():
        paths += sorted(folder.glob("*.pub"))
    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id_of(key)] = key
    return keys


@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str


def rotate(key_path: Path, record: Callable[[Rotation], None]) -> Rotation:
    """Replace the signing key at `key_path` with a new one.

    `record` puts the rotation on record (signed by the old key) before any file
    changes; if it raises, nothing has. Both public keys reach the history before
    the key is replaced, so a crash at any point leaves a key that verifies.
    Rotations at once are serialized by a lock beside the key."""
    with locked(key_path):
        old = load_private_key(key_path)
        new = Ed25519PrivateKey.generate()
        rotation = Rotation(key_id_of(old.public_key()), key_id_of(new.public_key()))
        record(rotation)
        folder = history_folder(key_path)
        folder.mkdir(mode=0o700, exist_ok=True)
        private, public = pem_pair(new)
        replace_file(folder / f"{rotation.old_key_id}.pub", pem_pair(old)[1], 0o644)
        replace_file(folder / f"{rotation.new_key_id}.pub", public, 0o644)
        replace_file(key_path, private, 0o600)
        replace_file(public_key_path(key_path), public, 0o644)
    return rotation

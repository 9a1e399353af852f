"""Secret files (signing keys, the payload keyring) survive full disks and concurrent writers."""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from engine import manifest
from engine.secret_files import hand_over
from gateway.audit.capture import load_keyring, rotate_keyring
from tests.support import as_user, at_once


def _create_key_on_a_full_disk(out: str, queue: Any) -> None:
    # RLIMIT_FSIZE makes the kernel refuse writes past 64 bytes, as a full disk
    # would (EFBIG instead of ENOSPC); an Ed25519 PEM key is 119 bytes.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    try:
        manifest.create_signing_key(Path(out))
    except OSError as exc:
        queue.put(exc.strerror)
    else:
        queue.put("created")


def test_a_signing_key_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    # An empty or cut key file left by a failed write would be kept by every
    # later `bastion init` (it exists) and then fail the gateway's boot.
    out = tmp_path / "secrets" / "audit-signing.key"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_create_key_on_a_full_disk, args=(str(out), queue))
    child.start()
    assert queue.get(timeout=30) == "File too large"
    child.join(timeout=30)
    assert list(out.parent.iterdir()) == [], "a failed write left a file behind"

    key_id = manifest.create_signing_key(out)  # the retry, with room on the disk
    assert manifest.key_id_of(manifest.load_private_key(out).public_key()) == key_id
    assert manifest.key_id_of(manifest.load_public_key(Path(f"{out}.pub"))) == key_id
    assert out.stat().st_mode & 0o777 == 0o600
    assert Path(f"{out}.pub").stat().st_mode & 0o777 == 0o644
    before = out.read_bytes()
    try:
        manifest.create_signing_key(out)
    except FileExistsError:
        pass
    else:
        raise AssertionError("an existing signing key was overwritten")
    assert out.read_bytes() == before
    assert manifest.key_id_of(manifest.load_public_key(Path(f"{out}.pub"))) == key_id


def test_rotations_at_once_keep_every_key(tmp_path: Path) -> None:
    # A key dropped by a racing rotation may already seal payloads in a
    # gateway that reloaded the keyring between the two: those would never
    # decrypt again.
    path = tmp_path / "secrets" / "audit-keyring.json"
    made = {rotate_keyring(path)}
    for _ in range(5):
        made |= set(at_once(6, lambda: rotate_keyring(path)))
    ring = load_keyring(path)
    assert len(made) == 31, made
    assert set(ring.keys) == made
    assert ring.active in made
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit-keyring.json", "audit-keyring.json.lock"]


def test_a_handed_over_secret_is_never_readable_by_others() -> None:
    """`hand_over` copied the secret under the umask's mode (0644 here), then
    chowned it: run by a user who may not give files away (not root), it left
    that readable copy behind."""
    folder = Path(tempfile.mkdtemp(prefix="bastion-handover-", dir="/tmp"))
    try:
        os.chown(folder, 10003, 10003)
        src = folder / "engine.key"
        src.write_bytes(b"secret")
        os.chown(src, 10003, 10003)
        src.chmod(0o600)
        given = folder / "prepared" / "engine.key"

        def as_another_user() -> str:
            os.umask(0o022)
            hand_over(src, given, 0)  # to root: refused
            return "handed over"

        assert as_user(10003, 10003, as_another_user).startswith("PermissionError")
        assert sorted(p.name for p in given.parent.iterdir()) == [], "no copy left behind"

        hand_over(src, given, 10004)  # as root, over an earlier copy
        hand_over(src, given, 10004)
        assert given.read_bytes() == b"secret" and given.stat().st_mode & 0o777 == 0o400
        assert (given.stat().st_uid, given.stat().st_gid) == (10004, 10004)
        assert sorted(p.name for p in given.parent.iterdir()) == ["engine.key"]
    finally:
        shutil.rmtree(folder)

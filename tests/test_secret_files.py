"""Secret files (signing keys, the payload keyring) survive full disks and concurrent writers."""

from __future__ import annotations

import multiprocessing
import resource
import signal
from pathlib import Path
from typing import Any

from engine import manifest
from gateway.audit.capture import load_keyring, rotate_keyring


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


def _rotate_after_barrier(path: str, barrier: Any, queue: Any) -> None:
    barrier.wait()
    try:
        queue.put(rotate_keyring(Path(path)))
    except Exception as exc:  # reported to the test, which names it
        queue.put(repr(exc))


def test_rotations_at_once_keep_every_key(tmp_path: Path) -> None:
    # A key dropped by a racing rotation may already seal payloads in a
    # gateway that reloaded the keyring between the two: those would never
    # decrypt again.
    path = tmp_path / "secrets" / "audit-keyring.json"
    first = rotate_keyring(path)
    ctx = multiprocessing.get_context("fork")
    made = {first}
    for _ in range(5):
        barrier, queue = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_rotate_after_barrier, args=(str(path), barrier, queue)) for _ in range(6)]
        for p in procs:
            p.start()
        made |= {queue.get(timeout=30) for _ in procs}
        for p in procs:
            p.join(timeout=30)
    ring = load_keyring(path)
    assert len(made) == 31, made
    assert set(ring.keys) == made
    assert ring.active in made
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["audit-keyring.json", "audit-keyring.json.lock"]

"""Files that hold a secret (keys, peppers, tokens): created whole, once, owner-only.

Here rather than in the gateway because the engine side's manifest signing
keys need the same guarantees, and the engine package never imports the gateway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def write_secret_file(path: Path, data: bytes) -> None:
    """Create a file readable only by its owner, whole or not at all; FileExistsError if it exists.

    The bytes are written and fsynced to a private temporary file beside
    `path`, which is then hard-linked into place: link(2) refuses an existing
    name, so of two processes creating one secret exactly one wins, and no
    reader (nor a restart after a crash or a full disk) ever finds the file
    empty or cut short.
    """
    with _synced_temporary(path) as f:
        f.write(data)
    try:
        os.link(f.name, path)
    finally:
        os.unlink(f.name)
    fsync_folder(path.parent)


def ensure_secret_file(path: Path, make: Callable[[], bytes]) -> None:
    """Create `path` with `make()`'s bytes unless it exists (its folder 0700 if new).

    Of processes racing to create it (workers booting on a fresh state
    folder), the first to link its file wins and the others keep that one.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            write_secret_file(path, make())


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` whole with `mode`: a reader sees the old bytes or the new, never a part."""
    with replacing(path, mode) as f:
        f.write(data)


def hand_over(src: Path, dst: Path, uid: int) -> None:
    """Copy a secret file for one container user: `dst` owned by uid (and its group id), 0400.

    Compose and the Docker SDK bind-mount secret files, so the owner on the
    host is what the container sees. Needs root (chown). The copy is made
    private (0600, ours), given away, then renamed over `dst`: no one else can
    read it at any moment, and if giving it away fails nothing is left behind
    (a copy made under the umask, then chowned, was readable by all until the
    chown, and stayed so when the chown failed).
    """
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with replacing(dst, 0o400) as f:
        f.write(src.read_bytes())
        os.fchown(f.fileno(), uid, uid)


@contextlib.contextmanager
def replacing(path: Path, mode: int) -> Iterator[IO[bytes]]:
    """A file to write `path` through, as it is made (an export of any size).

    It is a new file beside `path` (0600 until done); when the block ends it is
    fsynced, given `mode` and renamed over `path`. If the block raises, or a
    write fails (a full disk), it is removed: `path` is as it was, or absent,
    never a part that looks whole.
    """
    with _synced_temporary(path) as f:
        yield f
    try:
        os.chmod(f.name, mode)
        os.replace(f.name, path)
    except BaseException:
        os.unlink(f.name)
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def _synced_temporary(path: Path) -> Iterator[IO[bytes]]:
    """A new 0600 file beside `path`, to write in the block; on disk (flushed,
    fsynced, closed) under its temporary name `f.name` when the block ends, and
    removed if the block or the sync raises."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise


def fsync_folder(folder: Path) -> None:
    """Make a new name in `folder` survive a power loss."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for changing `path` (a `.lock` file beside it, kept afterwards)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also when the process dies
        yield
    finally:
        os.close(fd)

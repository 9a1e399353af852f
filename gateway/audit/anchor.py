"""The external anchor: an append-only JSON-lines file of signed checkpoints and prunes.

Someone who can rewrite the audit tables can also delete checkpoint rows; the
anchor keeps a second copy elsewhere (point `audit.anchor_file` at storage the
database's administrators cannot rewrite: another host's mount, a WORM bucket
synced from it, a file with `chattr +a`). Each line is written with O_APPEND
and fsynced before the calls in its batch are answered.

Several processes append to one anchor (every worker, every CLI command), each
under an exclusive lock on the file. A write cut short (a disk filling up)
fails the batch and leaves a torn line; the batch's lines are all written again,
whole, by the next append, which first ends the torn line (a line of the file
may be another process's). So a torn line is always followed by the whole line
it began, and `read` skips it as such: it hides nothing, and the file never
has to be cut back (which `chattr +a` would not allow).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from gateway.audit.chain import Checkpoint, Prune


class AnchorLine(msgspec.Struct, tag_field="type", tag="checkpoint", kw_only=True):
    checkpoint: Checkpoint


class PruneLine(msgspec.Struct, tag_field="type", tag="prune", kw_only=True):
    prune: Prune


Line = AnchorLine | PruneLine
_decoder = msgspec.json.Decoder(Line)


class AnchorError(Exception):
    """The anchor file cannot be read or written."""


class AnchorFile:
    def __init__(self, path: Path):
        self.path = path
        # Whole lines whose append failed; written again, whole, before anything else.
        self._unwritten = b""

    def append(self, items: Iterable[Checkpoint | Prune]) -> None:
        """Append and fsync; on failure keep the lines for the next call and raise."""
        self._unwritten += b"".join(
            msgspec.json.encode(AnchorLine(checkpoint=i) if isinstance(i, Checkpoint) else PruneLine(prune=i)) + b"\n"
            for i in items
        )
        if not self._unwritten:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
                data = self._unwritten
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    data = b"\n" + data  # end a line torn by a write cut short
                # write(2) may write less than asked (a disk filling up): the
                # rest goes on, and if it cannot, every line is kept for the next
                # call. A line written twice is harmless: verify reads it once.
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
                self._unwritten = b""
            finally:
                os.close(fd)
        except OSError as exc:
            raise AnchorError(f"cannot append to the audit anchor {self.path}: {exc.strerror}") from exc

    @property
    def behind(self) -> bool:
        return bool(self._unwritten)

    def read(self) -> tuple[list[Checkpoint], list[Prune], list[str]]:
        """Checkpoints, prunes, and a note per line that could not be parsed."""
        checkpoints: list[Checkpoint] = []
        prunes: list[Prune] = []
        bad: list[str] = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise AnchorError(f"the audit anchor {self.path} does not exist") from None
        except OSError as exc:
            raise AnchorError(f"cannot read the audit anchor {self.path}: {exc.strerror}") from None
        raws = data.splitlines()
        for number, raw in enumerate(raws, 1):
            if not raw.strip():
                continue
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError as exc:
                # A line torn by a write cut short is followed by the whole line it began.
                if not any(len(later) > len(raw) and later.startswith(raw) for later in raws[number:]):
                    bad.append(f"line {number}: {exc}")
                continue
            if isinstance(line, AnchorLine):
                checkpoints.append(line.checkpoint)
            else:
                prunes.append(line.prune)
        return checkpoints, prunes, bad

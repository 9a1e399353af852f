"""The external anchor: an append-only JSON-lines file of signed checkpoints and prunes.

Someone who can rewrite the audit tables can also delete checkpoint rows; the
anchor keeps a second copy elsewhere (point `audit.anchor_file` at storage the
database's administrators cannot rewrite: another host's mount, a WORM bucket
synced from it, a file with `chattr +a`). Each line is written with O_APPEND
and fsynced before the calls in its batch are answered; a write cut short
(a disk filling up) fails the batch, and the next append writes the rest first.
Lines are short, so appends from several processes do not interleave.
"""

from __future__ import annotations

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
        # Bytes whose append failed; retried before anything else is written.
        # After a short write this starts mid-line, and the retry completes it.
        self._unwritten = b""

    def append(self, items: Iterable[Checkpoint | Prune]) -> None:
        """Append and fsync; on failure keep what was not written for the next call and raise."""
        self._unwritten += b"".join(
            msgspec.json.encode(AnchorLine(checkpoint=i) if isinstance(i, Checkpoint) else PruneLine(prune=i)) + b"\n"
            for i in items
        )
        if not self._unwritten:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                # write(2) may write less than asked (a disk filling up): what it
                # wrote is in the file, so only the rest is kept for the retry.
                attempt = self._unwritten
                while self._unwritten:
                    self._unwritten = self._unwritten[os.write(fd, self._unwritten) :]
                try:
                    os.fsync(fd)
                except OSError:
                    # Whether the written bytes reached the disk is unknown: write
                    # them again (a checkpoint line twice in the anchor is harmless).
                    self._unwritten = attempt
                    raise
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
        for number, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError as exc:
                bad.append(f"line {number}: {exc}")
                continue
            if isinstance(line, AnchorLine):
                checkpoints.append(line.checkpoint)
            else:
                prunes.append(line.prune)
        return checkpoints, prunes, bad

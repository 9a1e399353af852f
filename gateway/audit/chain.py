"""The hash chain of one writing process, and its signed checkpoints.

Each gateway process (and each CLI command that writes audit events) owns one
stream, so replicas never contend for a chain head. Records in a stream are
numbered 1, 2, 3... and each carries its predecessor's hash, so deleting,
inserting or reordering rows breaks a link. A chain alone cannot show that its
tail was cut off, so every `checkpoint_every` records or `checkpoint_seconds`
the head (stream, seq, hash, time) is signed with the audit signing key and
stored in SQL and in the external anchor file. Seq 0 is signed when a stream
opens, so a stream deleted whole is also noticed; a clean stop writes a
closing record and a `closed` checkpoint over it, so nothing may follow.

`Chain` is pure bookkeeping: `link()` prepares a batch without changing state;
`advance()` adopts it once the batch is committed. A batch that fails to commit
leaves the chain where it was.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.manifest import key_id_of, load_private_key
from gateway.audit.record import GENESIS, hash_row, iso

CHECKPOINT_VERSION = "bastion-audit-checkpoint/v1"
PRUNE_VERSION = "bastion-audit-prune/v1"


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One signed checkpoint; the same fields in SQL and in the anchor file."""

    stream_id: str
    seq: int
    record_hash: str
    signed_at: datetime
    closed: bool
    key_id: str
    signature: str  # base64 Ed25519 over message()

    def message(self) -> bytes:
        return msgspec.json.encode(
            [CHECKPOINT_VERSION, self.stream_id, self.seq, self.record_hash, iso(self.signed_at), self.closed]
        )


class Prune(msgspec.Struct, frozen=True, kw_only=True):
    """A signed statement that a stream's records up to `through` were pruned on purpose."""

    stream_id: str
    through: int
    signed_at: datetime
    key_id: str
    signature: str

    def message(self) -> bytes:
        return msgspec.json.encode([PRUNE_VERSION, self.stream_id, self.through, iso(self.signed_at)])


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def load(cls, path: Path) -> Signer:
        key = load_private_key(path)
        return cls(key, key_id_of(key.public_key()))

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.key.sign(message)).decode()

    def checkpoint(self, stream_id: str, seq: int, head: str, *, closed: bool = False) -> Checkpoint:
        unsigned = Checkpoint(
            stream_id=stream_id,
            seq=seq,
            record_hash=head,
            signed_at=datetime.now(UTC),
            closed=closed,
            key_id=self.key_id,
            signature="",
        )
        return msgspec.structs.replace(unsigned, signature=self.sign(unsigned.message()))

    def prune(self, stream_id: str, through: int) -> Prune:
        unsigned = Prune(
            stream_id=stream_id, through=through, signed_at=datetime.now(UTC), key_id=self.key_id, signature=""
        )
        return msgspec.structs.replace(unsigned, signature=self.sign(unsigned.message()))


def signature_valid(item: Checkpoint | Prune, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(base64.b64decode(item.signature, validate=True), item.message())
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Link:
    """A batch made ready for commit: chained rows and the checkpoints due with them."""

    rows: list[dict[str, Any]]
    checkpoints: list[Checkpoint]
    seq: int
    head: str


@dataclass
class Chain:
    stream_id: str
    signer: Signer
    checkpoint_every: int
    checkpoint_seconds: float
    seq: int = 0
    head: str = GENESIS
    # Seq of the last checkpoint committed; -1 until seq 0 (the opening) is.
    checkpointed: int = -1
    _checkpointed_at: float = field(default_factory=time.monotonic)

    def link(self, rows: list[dict[str, Any]], *, closing: bool = False) -> Link:
        checkpoints: list[Checkpoint] = []
        checkpointed = self.checkpointed
        if checkpointed < 0:
            checkpoints.append(self.signer.checkpoint(self.stream_id, 0, GENESIS))
            checkpointed = 0
        seq, head = self.seq, self.head
        for row in rows:
            seq += 1
            row["stream_id"], row["seq"], row["prev_hash"] = self.stream_id, seq, head
            head = row["record_hash"] = hash_row(row)
            if seq - checkpointed >= self.checkpoint_every and not (closing and row is rows[-1]):
                checkpoints.append(self.signer.checkpoint(self.stream_id, seq, head))
                checkpointed = seq
        if closing:
            checkpoints.append(self.signer.checkpoint(self.stream_id, seq, head, closed=True))
        elif seq > checkpointed and self._time_due():
            checkpoints.append(self.signer.checkpoint(self.stream_id, seq, head))
        return Link(rows, checkpoints, seq, head)

    def advance(self, link: Link) -> None:
        self.seq, self.head = link.seq, link.head
        if link.checkpoints:
            self.checkpointed = link.checkpoints[-1].seq
            self._checkpointed_at = time.monotonic()

    def resync(self, seq: int, head: str, checkpointed: int) -> None:
        """Adopt what the database holds (after a commit whose outcome is unknown)."""
        self.seq, self.head, self.checkpointed = seq, head, checkpointed

    def seconds_until_checkpoint(self) -> float | None:
        """None when every record is already checkpointed (nothing to wait for)."""
        if self.seq <= self.checkpointed:
            return None
        return max(0.0, self._checkpointed_at + self.checkpoint_seconds - time.monotonic())

    def _time_due(self) -> bool:
        return time.monotonic() - self._checkpointed_at >= self.checkpoint_seconds

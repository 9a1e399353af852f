"""API keys: format, keyed hashing, and the key store in SQL.

A key reads `bst_<key_id>_<secret>`. The key id is visible (it appears in
`keys list`, logs and audit rows) and picks the row; the secret is shown once at
creation and stored only as HMAC-SHA256 under a per-installation pepper, so a
stolen database alone cannot be used to check guesses offline. Comparison is
constant-time. Every request reads the row, so a revocation takes effect on the
very next request, also when it was made by another process (the CLI).

Rotation gives a key a new secret under the same id, so its policy block, its
rate limits and its identity in the trail carry over; the secret it replaced is
accepted for an overlap the operator chooses (none by default), so clients can
move over without an outage. A call made with that previous secret says so in
its audit record.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec
from msgspec.structs import replace as replace_struct
from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.secret_files import ensure_secret_file
from gateway.errors import KeyStoreUnavailable, Unauthenticated
from gateway.hotpath import AsyncHotPath, HotPath
from gateway.tables import LABEL_WIDTH, api_keys
from gateway.utc import as_utc

Role = Literal["user", "auditor", "admin"]
ROLES: tuple[Role, ...] = ("user", "auditor", "admin")
KEY_PREFIX = "bst"
_KEY_RE = re.compile(r"^bst_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as every later stage (policy, audit) sees it."""

    auth_method: str  # api_key | oidc | mtls
    # The API key's id; for token and certificate callers a stable id derived
    # from issuer and subject (`oidc-...`, `mtls-...`): per-caller rate limits
    # and policy key overrides use it.
    key_id: str
    name: str
    role: Role
    team: str
    # Auditor keys may be allowed to read captured payloads in plaintext.
    can_decrypt: bool = False
    issuer: str | None = None
    subject: str | None = None
    # SHA-256 of the client certificate the connection presented, if any.
    fingerprint: str | None = None
    # An API key's secret from before its rotation, accepted during the overlap.
    previous_secret: bool = False

    def with_certificate(self, fingerprint: str) -> Principal:
        return replace(self, fingerprint=fingerprint)

    def audit(self) -> dict[str, str] | None:
        """What the audit record keeps of how the caller proved who it is, beyond the key id:
        a token's issuer and subject, a certificate's digest, that a key's previous secret was used (never a
        token or a secret)."""
        fields = {"issuer": self.issuer, "subject": self.subject, "cert_sha256": self.fingerprint}
        if self.previous_secret:
            fields["key_generation"] = "previous"
        kept = {k: v for k, v in fields.items() if v is not None}
        return kept or None


class KeyInfo(msgspec.Struct, frozen=True):
    key_id: str
    name: str
    role: str
    team: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    can_decrypt: bool = False
    rotated_at: datetime | None = None
    # Until when the secret replaced by the last rotation is accepted (its
    # rotation time when it was refused at once).
    previous_expires_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class NoActiveKey(LookupError):
    """A key to rotate that does not exist, is revoked or has expired."""


# Two secrets accepted for longer would undo much of what rotating is for.
MAX_OVERLAP = timedelta(days=30)


def check_overlap(overlap: timedelta) -> None:
    """ValueError unless `overlap` is a rotation's allowed overlap (0 to MAX_OVERLAP)."""
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise ValueError(f"the overlap must be between 0 and {MAX_OVERLAP.days} days")


@dataclass(frozen=True, slots=True)
class NewKey:
    info: KeyInfo
    secret: str  # the whole key; shown once, never stored


def load_or_create_pepper(path: Path) -> bytes:
    """The HMAC pepper: 32 random bytes in a 0600 file in the state folder."""
    # Every worker booting on a fresh state folder reads the one pepper the
    # first of them made, so all hash keys alike.
    ensure_secret_file(path, lambda: secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ValueError(f"{path} is too short to be a key pepper")
    return data


def ensure_token_file(path: Path) -> None:
    """A random token (engine keys, database passwords) in a 0600 file, made once."""
    ensure_secret_file(path, lambda: secrets.token_urlsafe(32).encode())


def hash_secret(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def check_label(what: str, value: str) -> None:
    """A caller's name and team are recorded whole in each of its calls'
    records, and shown as plain text: at most `LABEL_WIDTH` characters (the
    trail would cut a longer one, so two teams could read alike), none of them
    control or invisible formatting characters (an escape sequence, a
    right-to-left override). Raises ValueError saying which rule `what` breaks."""
    if len(value) > LABEL_WIDTH:
        raise ValueError(f"{what} is longer than {LABEL_WIDTH} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        raise ValueError(f"{what} holds a control or formatting character")


class KeyStore:
    """Key management over the async engine; look-ups on the call path go through `hot`."""

    def __init__(self, engine: AsyncEngine, pepper: bytes, hot: HotPath | None = None):
        self._engine = engine
        self._pepper = pepper
        self._hot = hot or AsyncHotPath(engine)

    async def create(
        self, *, name: str, role: Role, team: str = "", expires_at: datetime | None = None, can_decrypt: bool = False
    ) -> NewKey:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if can_decrypt and role != "auditor":
            raise ValueError("only auditor keys may decrypt captured payloads")
        check_label("the key's name", name)
        check_label("the key's team", team)
        if expires_at is not None and expires_at.utcoffset() != timedelta(0):
            # SQLite stores a time's fields without its zone: anything but UTC
            # would be read back hours off, and the key expire at the wrong time.
            raise ValueError("expires_at must be a time in UTC")
        now = _now()
        if expires_at is not None and expires_at <= now:
            # Almost surely a typo in the year: the key would be refused from its first call.
            raise ValueError(f"the expiry {expires_at:%Y-%m-%d %H:%M:%S} UTC is not in the future")
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)
        info = KeyInfo(key_id, name, role, team, now, expires_at, None, can_decrypt)
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    key_id=key_id,
                    name=name,
                    role=role,
                    team=team,
                    secret_hash=hash_secret(self._pepper, secret),
                    created_at=info.created_at,
                    expires_at=expires_at,
                    can_decrypt=can_decrypt,
                )
            )
        return NewKey(info=info, secret=f"{KEY_PREFIX}_{key_id}_{secret}")

    async def list(self) -> list[KeyInfo]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(*_INFO_COLUMNS).order_by(api_keys.c.created_at))).all()
        return [_info(r) for r in rows]

    async def rotate(self, key_id: str, overlap: timedelta = timedelta(0)) -> NewKey:
        """A new secret for an active key, under the same id. The secret it
        replaces is accepted for `overlap` more (zero: refused from the next
        request on, as `rotated_key`); one replaced by an earlier rotation is
        forgotten."""
        check_overlap(overlap)
        secret = secrets.token_urlsafe(32)
        now = _now()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(select(*_INFO_COLUMNS, api_keys.c.secret_hash).where(api_keys.c.key_id == key_id))
            ).first()
            before = _info(row) if row is not None else None
            if before is None or not before.active(now):
                raise NoActiveKey(f"no active key with id {key_id}")
            # Kept with a zero overlap too: a call with it is then refused as
            # `rotated_key`, which tells the operator who has not moved over.
            previous_until = now + overlap
            done = await conn.execute(
                update(api_keys)
                # Unchanged since it was read: two rotations at once cannot both win.
                .where(api_keys.c.key_id == key_id, api_keys.c.secret_hash == row.secret_hash)
                .where(api_keys.c.revoked_at.is_(None))
                .values(
                    secret_hash=hash_secret(self._pepper, secret),
                    rotated_at=now,
                    previous_secret_hash=row.secret_hash,
                    previous_expires_at=previous_until,
                )
            )
            if done.rowcount != 1:
                raise NoActiveKey(f"key {key_id} changed while it was being rotated; nothing was rotated")
        info = replace_struct(before, rotated_at=now, previous_expires_at=previous_until)
        return NewKey(info=info, secret=f"{KEY_PREFIX}_{key_id}_{secret}")

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key; False when no such (unrevoked) key exists."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        return result.rowcount == 1

    async def authenticate(self, authorization: str | None) -> Principal:
        """Turn an Authorization header into a Principal, or raise Unauthenticated.

        The caller sees one message for unknown, revoked and expired keys alike
        apart from expiry; the audit trail gets the precise reason.
        """
        if not authorization:
            raise Unauthenticated("Missing API key: send 'Authorization: Bearer <key>'.", audit_reason="missing_key")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "Malformed Authorization header: expected 'Bearer <key>'.", audit_reason="malformed_header"
            )
        match = _KEY_RE.match(token.strip())
        if match is None:
            raise Unauthenticated("Malformed API key.", audit_reason="malformed_key")
        key_id, secret = match.groups()
        try:
            row = await self._hot.key_row(key_id)
        except (SQLAlchemyError, OSError) as exc:
            raise KeyStoreUnavailable(
                "The key store is unavailable; the call was refused.", audit_reason=f"key_store_{type(exc).__name__}"
            ) from exc
        # Hash even when the row is missing, so timing does not tell which ids exist.
        presented = hash_secret(self._pepper, secret)
        stored = row.secret_hash if row is not None else "0" * 64
        current = hmac.compare_digest(presented, stored)
        previous = hmac.compare_digest(presented, (row and row.previous_secret_hash) or "0" * 64)
        if row is None or not (current or previous):
            raise Unauthenticated("Invalid API key.", audit_reason="unknown_key", claimed_key_id=key_id)
        if row.revoked_at is not None:
            raise Unauthenticated("Invalid API key.", audit_reason="revoked_key", claimed_key_id=key_id)
        expires_at = _aware(row.expires_at)
        if expires_at is not None and expires_at <= _now():
            raise Unauthenticated(
                "API key has expired.", code="expired_api_key", audit_reason="expired_key", claimed_key_id=key_id
            )
        if not current:
            overlap_ends = _aware(row.previous_expires_at)
            if overlap_ends is None or overlap_ends <= _now():
                raise Unauthenticated("Invalid API key.", audit_reason="rotated_key", claimed_key_id=key_id)
        return Principal(
            auth_method="api_key",
            key_id=key_id,
            name=row.name,
            role=row.role,
            team=row.team,
            can_decrypt=bool(row.can_decrypt) and row.role == "auditor",
            previous_secret=not current,
        )


_INFO_COLUMNS = [api_keys.c[n] for n in KeyInfo.__struct_fields__]


def _info(r: Any) -> KeyInfo:
    times = {n: _aware(getattr(r, n)) for n in ("created_at", "expires_at", "revoked_at", "rotated_at")}
    return KeyInfo(
        key_id=r.key_id,
        name=r.name,
        role=r.role,
        team=r.team,
        can_decrypt=bool(r.can_decrypt),
        previous_expires_at=_aware(r.previous_expires_at),
        **times,  # type: ignore[arg-type]
    )

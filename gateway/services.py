"""Everything a request handler needs, built once per gateway process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.manifest import Verification
from gateway.audit.anchor import AnchorFile
from gateway.audit.capture import KeyringError, Sealer, load_keyring
from gateway.audit.chain import Signer
from gateway.audit.writer import AuditWriter
from gateway.db import create_engine
from gateway.forward import Forwarder, Upstream
from gateway.hotpath import HotPath, hot_path_for
from gateway.integrity import Integrity
from gateway.keys import KeyStore, load_or_create_pepper
from gateway.settings import ConfigError, Settings

log = structlog.get_logger("bastion.services")


@dataclass
class Services:
    settings: Settings
    db: AsyncEngine
    hot: HotPath
    keys: KeyStore
    audit: AuditWriter
    forwarder: Forwarder
    # Routable models by the name clients use.
    upstreams: dict[str, Upstream]
    integrity: Integrity
    # Encrypts captured payloads; None when no team's capture mode is "encrypted".
    sealer: Sealer | None = None
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _periodic: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings, preverified: dict[str, Verification] | None = None) -> Services:
        upstreams = {d.name: Upstream(d.engine_url, read_engine_key(settings, d.name)) for d in settings.deployments}
        url, busy_ms = settings.database_url(), settings.database.sqlite_busy_timeout_ms
        db = create_engine(url, sqlite_busy_timeout_ms=busy_ms)
        hot = hot_path_for(url, db, busy_timeout_ms=busy_ms)
        audit = open_writer(settings, hot)
        sealer = payload_sealer(settings)
        await audit.start()
        integrity = Integrity(settings, audit)
        g = settings.gateway
        svc = cls(
            settings=settings,
            db=db,
            hot=hot,
            keys=KeyStore(db, load_or_create_pepper(settings.key_pepper_file), hot),
            audit=audit,
            forwarder=Forwarder(
                connect_timeout=g.engine_connect_timeout,
                read_timeout=g.engine_read_timeout,
                pool_size=g.engine_pool_size,
            ),
            upstreams=upstreams,
            integrity=integrity,
            sealer=sealer,
        )
        # Models stay unroutable (pending) until this finishes; the gateway answers meanwhile.
        svc.spawn(integrity.verify_all("boot", preverified))
        svc._periodic = asyncio.create_task(integrity.run_periodic(), name="reverify")
        return svc

    def reload_keyring(self) -> None:
        """Pick up a rotated payload keyring (SIGHUP); a broken one keeps the old in use."""
        try:
            self.sealer = payload_sealer(self.settings)
        except ConfigError as exc:
            log.error("keyring.reload_failed", error=str(exc))
            return
        log.info("keyring.reloaded", active=self.sealer.ring.active if self.sealer else None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run work that must finish even if the request that started it is cancelled."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.audit.close()
        await self.hot.close()
        await self.forwarder.close()
        await self.db.dispose()


def load_signer(settings: Settings) -> Signer:
    path = settings.audit_signing_key
    try:
        return Signer.load(path)
    except FileNotFoundError:
        raise ConfigError(f"audit signing key {path} not found (run `bastion init`)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the audit signing key {path}: {exc}") from None


def open_writer(settings: Settings, hot: HotPath) -> AuditWriter:
    """This process's audit writer, on a stream of its own, signing with the audit key."""
    a = settings.audit
    return AuditWriter.for_process(
        hot,
        load_signer(settings),
        AnchorFile(settings.audit_anchor_file),
        every=a.checkpoint_every,
        seconds=a.checkpoint_seconds,
        queue_max=a.queue_max,
        batch_max=a.batch_max,
    )


def payload_sealer(settings: Settings) -> Sealer | None:
    a = settings.audit
    if "encrypted" not in (a.capture, *a.capture_teams.values()):
        return None
    try:
        return Sealer(load_keyring(settings.audit_keyring_file), a.capture_max_bytes)
    except KeyringError as exc:
        raise ConfigError(str(exc)) from None


def preflight(settings: Settings, *, engine_keys: bool = True) -> None:
    """Load every secret the gateway needs, so a missing one stops the start with a clear error."""
    if engine_keys:
        for d in settings.deployments:
            read_engine_key(settings, d.name)
    load_signer(settings)
    payload_sealer(settings)


def read_engine_key(settings: Settings, name: str) -> str:
    deployment = settings.deployment(name)
    assert deployment is not None
    path = settings.engine_key_path(deployment)
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"deployment {name!r}: cannot read engine key file {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"deployment {name!r}: engine key file {path} is empty")
    return key

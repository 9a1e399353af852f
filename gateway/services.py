"""Everything a request handler needs, built once per gateway process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from engine.manifest import Verification
from gateway.audit import AuditWriter
from gateway.db import create_engine
from gateway.forward import Forwarder, Upstream
from gateway.hotpath import HotPath, hot_path_for
from gateway.integrity import Integrity
from gateway.keys import KeyStore, load_or_create_pepper
from gateway.settings import ConfigError, Settings


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
        audit = AuditWriter(hot, queue_max=settings.audit.queue_max, batch_max=settings.audit.batch_max)
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
        )
        # Models stay unroutable (pending) until this finishes; the gateway answers meanwhile.
        svc.spawn(integrity.verify_all("boot", preverified))
        svc._periodic = asyncio.create_task(integrity.run_periodic(), name="reverify")
        return svc

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

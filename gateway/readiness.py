"""What `/readyz` answers: are the models verified, the engines healthy, the
audit store writable and the rate-limit store reachable.

Each check run writes a heartbeat row and probes every engine, and `/readyz`
takes no credential: asked for as fast as a client could, it made the gateway
write to the audit store that often (on SQLite, the writer's lock), and cut
audited calls from 171 to 50 in five seconds on a 2-core machine. So a run's
answer is shared by every probe within `MAX_AGE_SECONDS`, and by every probe
that arrives while a run is in flight: at most one run a second, however
often it is asked. A load balancer probing every few seconds sees no
difference; a probe may see an engine or a store up to a second late.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import structlog
from sqlalchemy import insert, update

from gateway.tables import gateway_heartbeat

if TYPE_CHECKING:
    from gateway.services import Services

log = structlog.get_logger("bastion.readiness")

MAX_AGE_SECONDS = 1.0


class _Probes(msgspec.Struct, frozen=True):
    """What one run of the probes found."""

    engines: dict[str, str]
    audit_store: bool
    rate_limit_store: bool


class Readiness:
    """The `/readyz` answer, as (HTTP status, JSON body). The models' states are
    read fresh (they are in memory); the probes are shared as above."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._probes: _Probes | None = None
        self._at = 0.0
        self._run: asyncio.Future[_Probes] | None = None

    async def answer(self) -> tuple[int, bytes]:
        probes = await self._latest()
        models = {n: self._svc.integrity.state(n).public() for n in self._svc.upstreams}
        checks = {
            "engines": probes.engines,
            "models": models,
            "audit_store": "writable" if probes.audit_store else "unwritable",
            "rate_limit_store": "reachable" if probes.rate_limit_store else "unreachable",
        }
        problems = [f"engine {n} unhealthy" for n, ok in probes.engines.items() if ok != "healthy"]
        problems += [f"model {n} {m['status']}" for n, m in models.items() if m["status"] in ("pending", "failed")]
        if not probes.audit_store:
            problems.append("audit store unwritable")
        if not probes.rate_limit_store:
            problems.append("rate limit store unreachable")
        if not problems:
            return 200, msgspec.json.encode({"status": "ready", "checks": checks})
        body = {
            "error": {
                "message": "Not ready: " + "; ".join(problems),
                "type": "api_error",
                "param": None,
                "code": "not_ready",
            },
            "checks": checks,
        }
        return 503, msgspec.json.encode(body)

    async def _latest(self) -> _Probes:
        if self._probes is not None and asyncio.get_running_loop().time() - self._at < MAX_AGE_SECONDS:
            return self._probes
        if self._run is None:
            self._run = asyncio.ensure_future(self._probe())
            self._run.add_done_callback(self._keep)
        # Shielded: a probe that gives up does not cancel the run the others wait for.
        return await asyncio.shield(self._run)

    def _keep(self, run: asyncio.Future[_Probes]) -> None:
        self._run = None
        if not run.cancelled() and run.exception() is None:
            self._probes, self._at = run.result(), asyncio.get_running_loop().time()

    async def _probe(self) -> _Probes:
        svc = self._svc
        names = list(svc.upstreams)
        healthy = await asyncio.gather(*(svc.forwarder.health(svc.upstreams[n]) for n in names))
        audit_ok, limits_ok = await asyncio.gather(_audit_store_writable(svc), svc.limiter.reachable())
        engines = {n: ("healthy" if ok else "unhealthy") for n, ok in zip(names, healthy, strict=True)}
        return _Probes(engines, audit_ok, limits_ok)


async def _audit_store_writable(svc: Services) -> bool:
    now = datetime.now(UTC)
    try:
        async with asyncio.timeout(5):
            async with svc.db.begin() as conn:
                result = await conn.execute(
                    update(gateway_heartbeat)
                    .where(gateway_heartbeat.c.instance_id == svc.instance_id)
                    .values(beat_at=now)
                )
                if result.rowcount == 0:
                    await conn.execute(insert(gateway_heartbeat).values(instance_id=svc.instance_id, beat_at=now))
    except Exception as exc:
        log.warning("readyz.audit_store_unwritable", error=type(exc).__name__)
        return False
    return True

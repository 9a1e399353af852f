"""Which models may be served: verified against their signed manifests.

Every deployment with `verify = true` starts `pending` and becomes routable only
once its folder matches its manifest. Verification runs at boot, every
`integrity.reverify_seconds`, on SIGHUP and on POST /admin/models/verify; a model
that fails stops being routable at once. Each verification is an audit system
event (model, manifest digest, signer key id, bytes, duration, result).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.manifest import FolderPolicy, Progress, Verification, verify
from gateway.audit.record import system_record
from gateway.audit.writer import AuditWriter, write_quietly
from gateway.settings import Deployment, Settings
from gateway.trust import load_trusted

log = structlog.get_logger("bastion.integrity")
Status = Literal["pending", "verified", "failed", "unverified"]


@dataclass
class ModelState:
    status: Status
    manifest_sha256: str | None = None
    problems: tuple[str, ...] = ()
    checked_at: datetime | None = None

    def public(self) -> dict[str, object]:
        return {
            "status": self.status,
            "manifest_sha256": self.manifest_sha256,
            "problems": list(self.problems),
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
        }


def trusted_keys(settings: Settings) -> dict[str, Ed25519PublicKey]:
    """The model publishers' public keys by key id."""
    return load_trusted(settings, settings.publishers, "publisher")


def verify_deployment(
    settings: Settings, d: Deployment, trusted: dict[str, Ed25519PublicKey], progress: Progress | None = None
) -> Verification:
    return verify(
        settings.path(d.model_dir),
        settings.path(d.manifest),
        trusted,
        expected_model=d.expected_model,
        policy=FolderPolicy(tuple(d.allow_extra_files), d.allow_internal_symlinks),
        workers=settings.integrity.workers or None,
        progress=progress,
    )


class Integrity:
    def __init__(self, settings: Settings, audit: AuditWriter):
        self._settings = settings
        self._audit = audit
        self._trusted = trusted_keys(settings)
        self._lock = asyncio.Lock()
        self.states: dict[str, ModelState] = {
            d.name: ModelState("pending" if d.verify else "unverified") for d in settings.deployments
        }

    def state(self, name: str) -> ModelState:
        return self.states[name]

    async def verify_all(self, trigger: str, done: dict[str, Verification] | None = None) -> None:
        """Verify every model (one at a time; each hashes its files in parallel).

        `done` carries results already computed for this boot (by `bastion up`,
        which verifies before starting engines), so files are not hashed twice.
        """
        async with self._lock:
            for d in self._settings.deployments:
                if not d.verify:
                    continue
                result = (done or {}).get(d.name)
                if result is None:
                    result = await asyncio.to_thread(verify_deployment, self._settings, d, self._trusted)
                await self._record(d, result, trigger)

    async def _record(self, d: Deployment, result: Verification, trigger: str) -> None:
        previous = self.states[d.name].status
        now = datetime.now(UTC)
        problems = tuple(str(p) for p in result.problems)
        self.states[d.name] = ModelState(
            "verified" if result.ok else "failed", result.manifest_sha256 or None, problems, now
        )
        if not result.ok:
            log.error("model.verification_failed", model=d.name, trigger=trigger, problems=list(problems)[:20])
        elif previous != "verified":
            log.info(
                "model.verified",
                model=d.name,
                trigger=trigger,
                bytes=result.bytes_hashed,
                seconds=round(result.seconds, 3),
            )
        kinds = sorted({p.kind for p in result.problems})
        detail = {
            "trigger": trigger,
            "key_id": result.key_id,
            "bytes": result.bytes_hashed,
            "duration_s": round(result.seconds, 3),
            "previous_status": previous,
            "problem_kinds": kinds,
        }
        record = system_record(
            "model.verify",
            method="SYSTEM",
            at=now,
            detail=detail,
            ended_at=now,
            model=d.name,
            outcome="ok" if result.ok else "failed",
            error_type=None if result.ok else "integrity:" + ",".join(kinds),
            error_message="; ".join(problems)[:4000] or None,
            latency_ms=result.seconds * 1000,
            manifest_sha256=result.manifest_sha256 or None,
        )
        await write_quietly(self._audit, record)

    async def run_periodic(self) -> None:
        interval = self._settings.integrity.reverify_seconds
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            await self.verify_all("interval")

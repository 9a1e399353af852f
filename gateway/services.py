"""Everything a request handler needs, built once per gateway process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.address import reach_problem
from engine.manifest import Verification
from gateway.audit.anchor import AnchorFile
from gateway.audit.capture import KeyringError, Sealer, load_keyring
from gateway.audit.chain import Signer
from gateway.audit.record import system_record
from gateway.audit.writer import AuditWriter, write_quietly
from gateway.client_address import Networks
from gateway.db import create_engine
from gateway.forward import Forwarder, Upstream
from gateway.hotpath import HotPath, hot_path_for
from gateway.identity import Authenticator
from gateway.image_fetch import ImageFetcher
from gateway.integrity import Integrity
from gateway.keys import KeyStore, load_or_create_pepper
from gateway.policies import PolicyWatch, limiter_for, load_or_refuse
from gateway.readiness import Readiness
from gateway.settings import ConfigError, Settings
from policy import Policy, PolicyError, RateLimiter, load_policy

log = structlog.get_logger("bastion.services")


@dataclass
class Services:
    settings: Settings
    db: AsyncEngine
    hot: HotPath
    keys: KeyStore
    # API keys, OIDC tokens and client certificates → Principal.
    auth: Authenticator
    audit: AuditWriter
    forwarder: Forwarder
    # Routable models by the name clients use.
    upstreams: dict[str, Upstream]
    integrity: Integrity
    # The policy in force. A call reads it once, so a reload never splits a call.
    policy: Policy
    limiter: RateLimiter
    # Encrypts captured payloads; None when no team's capture mode is "encrypted".
    sealer: Sealer | None = None
    # Fetches allow-listed remote images; None when [media.fetch] allows no host.
    images: ImageFetcher | None = None
    # Proxies whose X-Forwarded-For names the caller (gateway.trusted_proxies; none by default).
    proxies: Networks = field(default_factory=lambda: Networks(()))
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _periodic: asyncio.Task[None] | None = None
    _watch: asyncio.Task[None] | None = None
    # What /readyz answers, checked at most once a second.
    readiness: Readiness = field(init=False)

    def __post_init__(self) -> None:
        self.readiness = Readiness(self)

    @classmethod
    async def start(cls, settings: Settings, preverified: dict[str, Verification] | None = None) -> Services:
        upstreams = {d.name: Upstream(d.engine_url, read_engine_key(settings, d.name)) for d in settings.deployments}
        url, busy_ms = settings.database_url(), settings.database.sqlite_busy_timeout_ms
        db = create_engine(url, sqlite_busy_timeout_ms=busy_ms)
        hot = hot_path_for(url, db, busy_timeout_ms=busy_ms)
        audit = open_writer(settings, hot)
        policy = load_or_refuse(settings.policy_file)
        sealer = payload_sealer(settings, policy)
        await audit.start()
        integrity = Integrity(settings, audit)
        g = settings.gateway
        keys = KeyStore(db, load_or_create_pepper(settings.key_pepper_file), hot)
        svc = cls(
            settings=settings,
            db=db,
            hot=hot,
            keys=keys,
            auth=Authenticator(settings.auth, keys, Path(settings.base_dir)),
            audit=audit,
            forwarder=Forwarder(
                connect_timeout=g.engine_connect_timeout,
                read_timeout=g.engine_read_timeout,
                pool_size=g.engine_pool_size,
                keepalive=g.engine_keepalive_seconds,
                max_answer_bytes=g.engine_max_answer_bytes,
            ),
            upstreams=upstreams,
            integrity=integrity,
            policy=policy,
            limiter=limiter_for(settings),
            sealer=sealer,
            images=image_fetcher(settings),
            proxies=Networks(g.trusted_proxies),
        )
        await svc._record_policy("policy.loaded", "boot", None)
        boot = integrity.verify_all("boot", preverified)
        if settings.gateway.workers > 1:
            # One of several workers on a shared socket starts taking calls only
            # once its models are verified: a worker that replaces one that died
            # would otherwise take calls from the others and answer them 503
            # (model_pending) while it hashes.
            await boot
        else:
            # Models stay unroutable (pending) until this finishes; the gateway answers meanwhile.
            svc.spawn(boot)
        svc._periodic = asyncio.create_task(integrity.run_periodic(), name="reverify")
        svc._watch = asyncio.create_task(svc._watch_policy(), name="policy-watch")
        return svc

    async def reload_policy(self, trigger: str) -> bool:
        """Replace the policy with the file's, if it is valid; else keep the old one.

        Either way the outcome is logged and audited. Returns whether it changed.
        """
        old = self.policy
        try:
            new = load_policy(self.settings.policy_file)
            sealer = self.sealer
            if new.uses_encrypted_capture and sealer is None:
                sealer = payload_sealer(self.settings, new)
        except (PolicyError, ConfigError) as exc:
            log.error("policy.reload_refused", trigger=trigger, error=str(exc))
            await self._record_policy("policy.reload_refused", trigger, old, error=str(exc))
            return False
        if new.sha256 == old.sha256:
            return False
        self.policy, self.sealer = new, sealer
        log.info("policy.reloaded", trigger=trigger, sha256=new.sha256, previous=old.sha256)
        await self._record_policy("policy.reloaded", trigger, old)
        return True

    async def _record_policy(self, event: str, trigger: str, previous: Policy | None, error: str | None = None) -> None:
        detail = {
            "trigger": trigger,
            "file": str(self.settings.policy_file),
            "sha256": self.policy.sha256 if error is None else None,
            "previous_sha256": previous.sha256 if previous else None,
            "teams": sorted(self.policy.teams) if error is None else None,
        }
        record = system_record(
            event,
            method="SYSTEM",
            detail={k: v for k, v in detail.items() if v is not None},
            outcome="refused" if error else "ok",
            error_type="policy_invalid" if error else None,
            error_message=error,
        )
        await write_quietly(self.audit, record)

    async def _watch_policy(self) -> None:
        interval = self.settings.policy.reload_seconds
        if interval <= 0:
            return
        watch = PolicyWatch(self.settings.policy_file)
        watch.mark_loaded()
        while True:
            await asyncio.sleep(interval)
            if watch.settled_change():
                watch.mark_loaded()
                await self.reload_policy("file")

    def reload_keyring(self) -> None:
        """Pick up a rotated payload keyring (SIGHUP); a broken one keeps the old in use."""
        try:
            self.sealer = payload_sealer(self.settings, self.policy)
        except ConfigError as exc:
            log.error("keyring.reload_failed", error=str(exc))
            return
        log.info("keyring.reloaded", active=self.sealer.ring.active if self.sealer else None)

    def reload_signer(self) -> None:
        """Sign this stream's next checkpoints with a rotated audit key (SIGHUP);
        a key that cannot be loaded keeps the old one in use."""
        try:
            signer = load_signer(self.settings)
        except ConfigError as exc:
            log.error("audit_key.reload_failed", error=str(exc))
            return
        if signer.key_id != self.audit.chain.signer.key_id:
            # Between two batches: link() runs whole on the loop, so no batch is signed by both.
            self.audit.chain.signer = signer
            log.info("audit_key.reloaded", key_id=signer.key_id)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run work that must finish even if the request that started it is cancelled."""
        task: asyncio.Task[Any] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in (self._periodic, self._watch):
            if task is not None:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.audit.close()
        await self.hot.close()
        await self.forwarder.close()
        if self.images is not None:
            await self.images.close()
        await self.limiter.close()
        await self.auth.close()
        await self.db.dispose()


def image_fetcher(settings: Settings) -> ImageFetcher | None:
    fetch = settings.media.fetch
    if not fetch.allow_hosts:
        return None
    return ImageFetcher(fetch, str(settings.path(fetch.ca_file)) if fetch.ca_file else None)


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


def payload_sealer(settings: Settings, policy: Policy) -> Sealer | None:
    """The sealer for encrypted capture, when the config or the policy asks for it."""
    a = settings.audit
    if a.capture != "encrypted" and not policy.uses_encrypted_capture:
        return None
    try:
        return Sealer(load_keyring(settings.audit_keyring_file), a.capture_max_bytes)
    except KeyringError as exc:
        raise ConfigError(str(exc)) from None


def preflight(settings: Settings, *, engine_keys: bool = True) -> None:
    """Load every secret the gateway needs, and check it may reach every engine
    socket that exists, so that a missing secret or a gateway outside a socket's
    group stops the start with a clear error (group membership is fixed for the
    process's life: every call would fail)."""
    for d in settings.deployments:
        if problem := reach_problem(d.engine_url):
            raise ConfigError(f"deployment {d.name!r}: cannot reach the engine's socket: {problem}")
    if engine_keys:
        for d in settings.deployments:
            read_engine_key(settings, d.name)
    load_signer(settings)
    payload_sealer(settings, load_or_refuse(settings.policy_file))


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

"""Rate limits: requests and tokens per minute, and concurrent calls.

Requests and tokens are token buckets that hold a minute's allowance and refill
continuously (limit/60 a second), so there is no burst at a window boundary.
A call takes from every bucket it names or from none (all-or-nothing), so a
call refused by its team's limit does not use up its key's. Tokens are reserved
before the call (`Bucket.cost`) and settled with the engine's usage after it;
a call that used more than it reserved leaves the bucket in debt.
Concurrency is a set of leases, returned when the call ends.

Two backends, one behaviour: `MemoryLimiter` for a single gateway, and
`RedisLimiter` (policy/redis_limits.py) when replicas must share one limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from policy.decide import Bucket

# How long a concurrency lease lives if its gateway dies without returning it.
LEASE_SECONDS = 900.0


@dataclass(frozen=True, slots=True)
class Level:
    """A bucket after an admission: what is left, and seconds until it is full again."""

    bucket: Bucket
    remaining: float
    reset: float


@dataclass(frozen=True, slots=True)
class Lease:
    """What an admitted call holds: its buckets, to settle and release when it ends."""

    lease_id: str
    buckets: tuple[Bucket, ...]


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    lease: Lease
    levels: tuple[Level, ...] = ()
    # Refused: the bucket that refused, and when a retry can succeed.
    blocked: Bucket | None = None
    retry_after: float = 0.0
    # Refused for good: the call costs more than the bucket can ever hold.
    never: bool = False


class RateLimiter(Protocol):
    async def acquire(self, buckets: tuple[Bucket, ...], lease_id: str) -> Admission: ...

    async def settle(self, lease: Lease, tokens_used: int | None) -> None:
        """Return the lease's concurrency slots; correct its token reservation to
        `tokens_used` (None: the call's usage is unknown, the reservation stands)."""
        ...

    async def reachable(self) -> bool:
        """Whether calls can be admitted now (the store answers): for readiness probes."""
        ...

    async def close(self) -> None: ...


def refill_seconds(bucket: Bucket, level: float) -> float:
    if bucket.kind == "concurrent":
        return 0.0
    return max(0.0, (bucket.limit - level) * 60.0 / bucket.limit)


class MemoryLimiter:
    """Limits held in this process (one gateway)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._now = clock
        self._levels: dict[str, tuple[float, float]] = {}  # bucket name → (level, at)
        self._leases: dict[str, set[str]] = {}  # concurrency bucket name → lease ids
        self._lock = asyncio.Lock()

    def _level(self, b: Bucket, now: float) -> float:
        if b.kind == "concurrent":
            return b.limit - len(self._leases.get(b.name, ()))
        level, at = self._levels.get(b.name, (float(b.limit), now))
        return min(float(b.limit), level + (now - at) * b.limit / 60.0)

    async def acquire(self, buckets: tuple[Bucket, ...], lease_id: str) -> Admission:
        lease = Lease(lease_id, buckets)
        async with self._lock:
            now = self._now()
            levels = [self._level(b, now) for b in buckets]
            wait, blocked = 0.0, None
            for b, level in zip(buckets, levels, strict=True):
                if b.cost > b.limit:
                    return Admission(False, lease, blocked=b, never=True)
                if level < b.cost:
                    need = 1.0 if b.kind == "concurrent" else (b.cost - level) * 60.0 / b.limit
                    if need > wait:
                        wait, blocked = need, b
            if blocked is not None:
                return Admission(False, lease, _levels(buckets, levels), blocked, wait)
            for b, level in zip(buckets, levels, strict=True):
                if b.kind == "concurrent":
                    self._leases.setdefault(b.name, set()).add(lease_id)
                else:
                    self._levels[b.name] = (level - b.cost, now)
            return Admission(
                True, lease, _levels(buckets, [lv - b.cost for b, lv in zip(buckets, levels, strict=True)])
            )

    async def settle(self, lease: Lease, tokens_used: int | None) -> None:
        async with self._lock:
            now = self._now()
            for b in lease.buckets:
                if b.kind == "concurrent":
                    self._leases.get(b.name, set()).discard(lease.lease_id)
                elif b.kind == "tokens" and tokens_used is not None and tokens_used != b.cost:
                    level = self._level(b, now)
                    self._levels[b.name] = (min(float(b.limit), level + b.cost - tokens_used), now)

    async def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _levels(buckets: tuple[Bucket, ...], levels: list[float]) -> tuple[Level, ...]:
    return tuple(Level(b, lv, refill_seconds(b, lv)) for b, lv in zip(buckets, levels, strict=True))

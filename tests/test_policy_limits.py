"""Rate-limit backends, the in-process one and Redis (the real server on
127.0.0.1:6379), held to the same behaviour."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from typing import Any

import pytest

from policy import Bucket, LimiterUnavailable, MemoryLimiter, RateLimiter
from policy.redis_limits import RedisLimiter
from policy.rules import Rule
from tests.support import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
R = Rule("test")


def bucket(name: str, kind: str, limit: int, cost: int = 1) -> Bucket:
    return Bucket(name, kind, limit, cost, R)  # type: ignore[arg-type]


class Limiters:
    """Limiters that share state with each other (for Redis: one key prefix per test)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.prefix = f"bastion-test-{secrets.token_hex(4)}"
        self.shared = MemoryLimiter()
        self.made: list[RateLimiter] = []

    def __call__(self) -> RateLimiter:
        limiter: RateLimiter = self.shared if self.backend == "memory" else RedisLimiter(REDIS_URL, prefix=self.prefix)
        self.made.append(limiter)
        return limiter


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Limiters:
    return Limiters(request.param)


def run(coro: Coroutine[Any, Any, None], limiters: Limiters | None = None) -> None:
    """Run a test body, closing its limiters on the same event loop."""

    async def body() -> None:
        try:
            await coro
        finally:
            for limiter in limiters.made if limiters else ():
                await limiter.close()

    asyncio.run(body())


def test_requests_per_minute_all_or_nothing(make_limiter: Limiters) -> None:
    async def go() -> None:
        limiter = make_limiter()
        team = bucket("rpm:team:t", "requests", 3)
        a = (bucket("rpm:key:a", "requests", 2), team)
        b = (bucket("rpm:key:b", "requests", 2), team)
        assert (await limiter.acquire(a, "1")).allowed
        assert (await limiter.acquire(a, "2")).allowed
        refused = await limiter.acquire(a, "3")
        assert not refused.allowed and refused.blocked == a[0]
        # Refill is 2/60 per second: the next request is about 30 s away.
        assert 25 < refused.retry_after <= 30
        # The refused call took nothing from the team: one team request is left.
        assert (await limiter.acquire(b, "4")).allowed
        last = await limiter.acquire(b, "5")
        assert not last.allowed and last.blocked == team
        levels = {lv.bucket.name: lv.remaining for lv in last.levels}
        assert levels["rpm:key:b"] == pytest.approx(1, abs=0.01)

    run(go(), make_limiter)


def test_tokens_are_reserved_then_settled(make_limiter: Limiters) -> None:
    async def go() -> None:
        limiter = make_limiter()
        first = await limiter.acquire((bucket("tpm:key:a", "tokens", 100, 80),), "1")
        assert first.allowed and first.levels[0].remaining == pytest.approx(20, abs=0.5)
        assert not (await limiter.acquire((bucket("tpm:key:a", "tokens", 100, 50),), "2")).allowed
        await limiter.settle(first.lease, tokens_used=10)  # 70 of the 80 come back
        again = await limiter.acquire((bucket("tpm:key:a", "tokens", 100, 50),), "3")
        assert again.allowed and again.levels[0].remaining == pytest.approx(40, abs=0.5)
        # Using more than reserved leaves a debt: 40 + 50 - 120 = -30, so one
        # token is 31 tokens of refill away (at 100/60 a second: 18.6 s).
        await limiter.settle(again.lease, tokens_used=120)
        debt = await limiter.acquire((bucket("tpm:key:a", "tokens", 100, 1),), "4")
        assert not debt.allowed and debt.retry_after == pytest.approx(18.6, abs=0.5)

    run(go(), make_limiter)


def test_a_call_larger_than_the_limit_never_fits(make_limiter: Limiters) -> None:
    async def go() -> None:
        admission = await make_limiter().acquire((bucket("tpm:key:a", "tokens", 100, 101),), "1")
        assert not admission.allowed and admission.never

    run(go(), make_limiter)


def test_concurrency_slots_are_returned(make_limiter: Limiters) -> None:
    async def go() -> None:
        limiter = make_limiter()
        conc = (bucket("conc:team:t", "concurrent", 2),)
        one, two = await limiter.acquire(conc, "1"), await limiter.acquire(conc, "2")
        assert one.allowed and two.allowed
        assert not (await limiter.acquire(conc, "3")).allowed
        await limiter.settle(one.lease, None)
        assert (await limiter.acquire(conc, "4")).allowed

    run(go(), make_limiter)


def test_two_limiters_share_one_limit(make_limiter: Limiters) -> None:
    async def go() -> None:
        first, second = make_limiter(), make_limiter()
        rpm = (bucket("rpm:team:t", "requests", 5),)
        results = [await (first if i % 2 else second).acquire(rpm, str(i)) for i in range(10)]
        assert sum(a.allowed for a in results) == 5

    run(go(), make_limiter)


def test_concurrent_admissions_do_not_overshoot(make_limiter: Limiters) -> None:
    async def go() -> None:
        limiter = make_limiter()
        rpm = (bucket("rpm:team:t", "requests", 20),)
        results = await asyncio.gather(*(limiter.acquire(rpm, str(i)) for i in range(60)))
        assert sum(a.allowed for a in results) == 20

    run(go(), make_limiter)


def test_redis_unreachable_is_an_error_not_a_pass() -> None:
    async def go() -> None:
        # A loopback port nobody listens on: connections are refused.
        limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        try:
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire((bucket("rpm:key:a", "requests", 5),), "1")
        finally:
            await limiter.close()

    run(go())


def test_redis_calls_beyond_the_pool_wait_for_a_connection() -> None:
    """More calls in flight than connections: each waits its turn, none is refused."""

    async def go() -> None:
        limiter = RedisLimiter(REDIS_URL, prefix=f"bastion-test-{secrets.token_hex(4)}", max_connections=2)
        try:
            rpm = bucket("rpm:key:a", "requests", 1000)
            results = await asyncio.gather(*(limiter.acquire((rpm,), str(i)) for i in range(200)))
            assert all(a.allowed for a in results)
        finally:
            await limiter.close()

    run(go())

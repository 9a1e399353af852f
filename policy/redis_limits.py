"""Rate limits shared by every gateway replica, in Redis.

Each admission and each settlement is one Lua script, so it is atomic across
replicas and costs one round trip. The script reads Redis's own clock (TIME),
so replicas whose clocks disagree still agree on the limit. Keys expire once a
bucket would be full again, so idle callers leave nothing behind. All keys of
one call are read in one script: on Redis Cluster put them in one slot with a
hash-tagged prefix (`{bastion}`).

Redis unreachable or slow means `LimiterUnavailable`: the gateway refuses the
call rather than let it through unlimited.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from policy.decide import Bucket
from policy.errors import LimiterUnavailable
from policy.limits import LEASE_SECONDS, Admission, Lease, Level, refill_seconds

# KEYS: bucket keys. ARGV: lease id, lease seconds, then (kind, limit, cost) per key.
# Returns {admitted (1, 0, or -1 = never fits), retry seconds, index of the
# blocking bucket (1-based, 0 = none), level of each bucket...}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local levels, wait, blocked = {}, 0, 0
for i, key in ipairs(KEYS) do
  local kind, limit, cost = ARGV[3*i], tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
  if cost > limit then return {-1, '0', i} end
  local level, need = 0, 0
  if kind == 'concurrent' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    level = limit - redis.call('ZCARD', key)
    if level < cost then need = 1 end
  else
    local v = redis.call('HMGET', key, 'l', 't')
    if v[1] then
      level = math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60)
    else
      level = limit
    end
    if level < cost then need = (cost - level) * 60 / limit end
  end
  levels[i] = level
  if need > wait then wait, blocked = need, i end
end
local out = {blocked == 0 and 1 or 0, tostring(wait), blocked}
for i, key in ipairs(KEYS) do
  local kind, limit, cost = ARGV[3*i], tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
  if blocked == 0 then
    levels[i] = levels[i] - cost
    if kind == 'concurrent' then
      redis.call('ZADD', key, now + ttl, lease)
      redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
    else
      redis.call('HSET', key, 'l', tostring(levels[i]), 't', tostring(now))
      redis.call('PEXPIRE', key, math.ceil((limit - levels[i]) * 60000 / limit) + 1000)
    end
  end
  out[#out + 1] = tostring(levels[i])
end
return out
"""

# KEYS: bucket keys. ARGV: lease id, then (kind, limit, refund) per key.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  local kind, limit, refund = ARGV[3*i-1], tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  if kind == 'concurrent' then
    redis.call('ZREM', key, ARGV[1])
  elseif refund ~= 0 then
    local v = redis.call('HMGET', key, 'l', 't')
    local level = limit
    if v[1] then level = math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60) end
    level = math.min(limit, level + refund)
    redis.call('HSET', key, 'l', tostring(level), 't', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((limit - level) * 60000 / limit) + 1000)
  end
end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, *, prefix: str = "bastion", timeout: float = 0.5, max_connections: int = 64) -> None:
        # A blocking pool: with more calls in flight than connections, a call
        # waits for a free one (up to `timeout`). redis-py's default pool
        # refuses at once when its 100 connections are busy, which under load
        # turned ordinary calls into 503s (bench/suite, 256 concurrent calls).
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._redis = redis.Redis.from_pool(pool)  # closing the client closes the pool
        self._prefix = prefix.rstrip(":") + ":rl:"
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._settle = self._redis.register_script(_SETTLE)

    def _keys(self, buckets: tuple[Bucket, ...]) -> list[str]:
        return [self._prefix + b.name for b in buckets]

    async def acquire(self, buckets: tuple[Bucket, ...], lease_id: str) -> Admission:
        lease = Lease(lease_id, buckets)
        if not buckets:
            return Admission(True, lease)
        args: list[Any] = [lease_id, LEASE_SECONDS]
        for b in buckets:
            args += [b.kind, b.limit, b.cost]
        try:
            reply = await self._acquire(keys=self._keys(buckets), args=args)
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"the rate-limit store is unavailable: {type(exc).__name__}") from exc
        admitted, wait, blocked = int(reply[0]), float(reply[1]), int(reply[2])
        if admitted == -1:
            return Admission(False, lease, blocked=buckets[blocked - 1], never=True)
        levels = tuple(
            Level(b, float(lv), refill_seconds(b, float(lv))) for b, lv in zip(buckets, reply[3:], strict=True)
        )
        if admitted:
            return Admission(True, lease, levels)
        return Admission(False, lease, levels, buckets[blocked - 1], wait)

    async def settle(self, lease: Lease, tokens_used: int | None) -> None:
        if not lease.buckets:
            return
        args: list[Any] = [lease.lease_id]
        for b in lease.buckets:
            refund = b.cost - tokens_used if b.kind == "tokens" and tokens_used is not None else 0
            args += [b.kind, b.limit, refund]
        try:
            await self._settle(keys=self._keys(lease.buckets), args=args)
        except (RedisError, OSError) as exc:
            # The slots expire on their own (LEASE_SECONDS); the tokens stay reserved.
            raise LimiterUnavailable(f"the rate-limit store is unavailable: {type(exc).__name__}") from exc

    async def reachable(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()

"""The gateway's side of policy: the file it watches, the limiter it uses, and
the OpenAI-style rate-limit headers it sends."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import ConfigError, Settings
from policy import Policy, PolicyError, RateLimiter, load_policy
from policy.limits import Level, MemoryLimiter

Stat = tuple[int, int, int]


def load_or_refuse(path: Path) -> Policy:
    """The policy at `path`; a missing or invalid file stops the start (exit 2)."""
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise ConfigError(f"policy: {exc}") from None


def limiter_for(settings: Settings) -> RateLimiter:
    rl = settings.policy.rate_limits
    if rl.backend == "redis":
        from policy.redis_limits import RedisLimiter

        return RedisLimiter(
            rl.redis_url, prefix=rl.key_prefix, timeout=rl.timeout_seconds, max_connections=rl.max_connections
        )
    return MemoryLimiter()


@dataclass
class PolicyWatch:
    """Says when the policy file has changed and then held still for one poll.

    Waiting for the file to hold still matters: an editor that writes in place
    can be caught halfway, and half a policy can parse (a list of content
    rules cut short) and allow more than the whole. Renaming a finished file
    into place is still the way to change it (docs/policy.md).
    """

    path: Path
    seen: Stat | None = None
    pending: Stat | None = None

    @staticmethod
    def stat(path: Path) -> Stat | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def mark_loaded(self) -> None:
        self.seen = self.stat(self.path)
        self.pending = None

    def settled_change(self) -> bool:
        now = self.stat(self.path)
        if now == self.seen:
            self.pending = None
            return False
        if now != self.pending:
            self.pending = now
            return False
        return True


def _duration(seconds: float) -> str:
    """OpenAI's form: `120ms`, `17s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rate_headers(levels: tuple[Level, ...]) -> dict[str, str]:
    """`x-ratelimit-*` headers from the tightest requests and tokens buckets of a call."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        mine = [lv for lv in levels if lv.bucket.kind == kind]
        if not mine:
            continue
        tight = min(mine, key=lambda lv: lv.remaining / lv.bucket.limit)
        headers[f"x-ratelimit-limit-{kind}"] = str(tight.bucket.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(tight.remaining)))
        headers[f"x-ratelimit-reset-{kind}"] = _duration(tight.reset)
    return headers

"""How many connections one gateway process holds open, in all and per client.

Every open connection costs a file descriptor and the protocol's buffers, and
a streamed answer holds an engine connection too. Without a cap, one client
(or many) could open connections until the process runs out of descriptors,
and then nobody is served. Past `gateway.max_connections`, or past
`max_connections_per_client` from one address, a new connection's first
request is answered 503 (gateway/http_protocol.py) and the connection closed.

A trusted proxy (`gateway.trusted_proxies`) carries many callers' connections,
so its connections count only towards the total. The counts are per worker
process: with `gateway.workers = N`, the gateway as a whole holds up to N times.

A connection over the caps that sends no request is closed unanswered and has
no audit record (there is no request to record). Such connections are what a
flood meant to exhaust the caps looks like, so they are counted and logged as
one `http.turned_away_silent` line per SUMMARY_SECONDS, with the addresses that
sent the most, rather than a line each. What is counted when the process
stops (SIGTERM, a worker replaced) is logged by the app's shutdown
(`flush_all`), not dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import structlog

from gateway.client_address import Networks
from gateway.errors import TooManyConnections

log = structlog.get_logger("bastion.http")

SUMMARY_SECONDS = 10.0
# Addresses named in a summary line; and tracked between lines, so that a
# flood from many addresses costs bounded memory (the rest are only counted).
TOP_CLIENTS = 5
MAX_TRACKED_CLIENTS = 1024


# Limits with a summary line still due. The timer dies with the loop, and
# uvicorn ends the process by raising SIGTERM again after the app's shutdown
# (no exit hook runs), so the app's shutdown calls `flush_all`: it cannot
# reach the instance itself, which uvicorn builds into the HTTP protocol
# factory apart from the app (gateway/server.py).
_due: set[ConnectionLimits] = set()


def flush_all() -> None:
    """Log every summary line still due in this process (at shutdown)."""
    for limits in list(_due):
        limits.flush()


class ConnectionLimits:
    """The open connections of one process, counted by peer address."""

    def __init__(self, total: int, per_client: int, proxies: Networks) -> None:
        self._total, self._per_client, self._proxies = total, per_client, proxies
        self._open: Counter[str | None] = Counter()
        self._count = 0
        self._silent: Counter[str | None] = Counter()
        self._silent_count = 0
        self._silent_since = 0.0

    def open(self, peer: str | None) -> TooManyConnections | None:
        """Count a new connection from `peer`; the refusal it gets when it is one too many.

        A refused connection is not counted (and must not be `close`d here).
        """
        if self._count >= self._total:
            return TooManyConnections(
                f"The gateway holds its maximum of {self._total} connections; try again shortly.",
                audit_reason="too_many_connections",
            )
        if self._open[peer] >= self._per_client and peer not in self._proxies:
            return TooManyConnections(
                f"This client holds its maximum of {self._per_client} connections to the gateway;"
                " reuse one, or try again once one has closed.",
                audit_reason="too_many_client_connections",
            )
        self._open[peer] += 1
        self._count += 1
        return None

    def close(self, peer: str | None) -> None:
        """A connection counted by `open` has closed."""
        self._count -= 1
        self._open[peer] -= 1
        if not self._open[peer]:
            del self._open[peer]

    def turned_away_silent(self, peer: str | None, loop: asyncio.AbstractEventLoop) -> None:
        """A connection refused by `open` closed without sending a request."""
        if not self._silent_count:
            self._silent_since = time.monotonic()
            loop.call_later(SUMMARY_SECONDS, self.flush)
            _due.add(self)
        self._silent_count += 1
        if peer in self._silent or len(self._silent) < MAX_TRACKED_CLIENTS:
            self._silent[peer] += 1

    def flush(self) -> None:
        """Log the silent turn-aways counted since the last summary line, if any."""
        _due.discard(self)
        if not self._silent_count:
            return
        log.warning(
            "http.turned_away_silent",
            count=self._silent_count,
            seconds=round(time.monotonic() - self._silent_since, 1),
            clients=dict(self._silent.most_common(TOP_CLIENTS)),
        )
        self._silent.clear()
        self._silent_count = 0

"""The load: wrk for closed-loop non-streamed requests (a C client, so the load
generator is not what a 2-core machine measures), and an aiohttp client on
uvloop for what wrk cannot do: streams (time to first token, chunks), many
open streams at once, and an open-loop fixed arrival rate."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.suite import procs
from bench.suite.targets import Endpoint

WRK_SCRIPT = Path(__file__).with_name("wrk.lua")


@dataclass
class Measured:
    """What one scenario measured on one target."""

    requests: int = 0  # answered with 200 (streams: ended with [DONE])
    errors: int = 0  # anything else: a non-200, a broken connection, a timeout, no answer at all
    seconds: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def combined(runs: list[Measured]) -> Measured:
    """Rounds of one scenario on one target as one result: counts and time
    summed (so req/s is over all rounds), each percentile and each other
    figure (time to first token, chunks/s) the median of the rounds' own."""

    def median(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return known[len(known) // 2] if known else None

    failed = sum(1 for r in runs if r.extra.get("failed_run"))
    names = dict.fromkeys(name for r in runs for name in r.extra)  # every round's, in first-seen order
    return Measured(
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        seconds=sum(r.seconds for r in runs),
        p50_ms=median([r.p50_ms for r in runs]),
        p90_ms=median([r.p90_ms for r in runs]),
        p99_ms=median([r.p99_ms for r in runs]),
        extra={name: median([r.extra.get(name) for r in runs]) or 0.0 for name in names}
        | {"rounds": float(len(runs))}
        | ({"failed_run": float(failed)} if failed else {}),
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))]


def wrk(endpoint: Endpoint, body: bytes, connections: int, seconds: float) -> Measured:
    """Closed loop: `connections` keep-alive connections, each sending the next
    request when the last is answered, for `seconds`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        env = {
            **os.environ,
            "BENCH_BODY": f.name,
            "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in endpoint.headers.items()),
        }
        threads = min(2, connections)
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:.0f}s", "--timeout", "60s",
                "-s", str(WRK_SCRIPT), endpoint.url]  # fmt: skip
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    errors = sum(summary[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Measured(
        requests=summary["requests"] - summary["status"],
        errors=errors,
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p90_ms=summary["p90_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
    )


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=600, sock_read=120),
    )


@dataclass
class _Stream:
    ok: bool
    ttft: float | None  # seconds to the first event with generated text
    chunks: int
    seconds: float


async def _one_stream(session: aiohttp.ClientSession, endpoint: Endpoint, body: bytes) -> _Stream:
    t0 = time.perf_counter()
    first, chunks, done = None, 0, False
    headers = {**endpoint.headers, "content-type": "application/json"}
    try:
        async with session.post(endpoint.url, data=body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return _Stream(False, None, 0, time.perf_counter() - t0)
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
    except (aiohttp.ClientError, TimeoutError):
        return _Stream(False, first, chunks, time.perf_counter() - t0)
    return _Stream(done, first, chunks, time.perf_counter() - t0)


def _measured(latencies_ms: list[float], errors: int, seconds: float, extra: dict[str, float]) -> Measured:
    """Answered calls (one latency each) and the rest, with their percentiles."""
    p50, p90, p99 = (percentile(latencies_ms, q) for q in (0.5, 0.9, 0.99))
    return Measured(len(latencies_ms), errors, seconds, p50, p90, p99, extra)


def _of_streams(results: list[_Stream], seconds: float, extra: dict[str, float]) -> Measured:
    """Streams that ended with [DONE] are answered; time to first token over those comes first in `extra`."""
    ok = [s for s in results if s.ok]
    ttfts = [s.ttft * 1000 for s in ok if s.ttft is not None]
    ttft = {"ttft_p50_ms": percentile(ttfts, 0.5) or 0.0, "ttft_p99_ms": percentile(ttfts, 0.99) or 0.0}
    return _measured([s.seconds * 1000 for s in ok], len(results) - len(ok), seconds, {**ttft, **extra})


def streams(
    endpoint: Endpoint, body: bytes, concurrency: int, seconds: float, cpu: Callable[[], float] | None
) -> Measured:
    """Closed loop of streamed calls; time to first token and chunks relayed.
    With `cpu` (the target's CPU seconds so far), also chunks per CPU second
    of the target: what one core of it relays."""

    async def run() -> tuple[list[_Stream], float, float]:
        results: list[_Stream] = []
        async with _session(concurrency) as session:
            await _one_stream(session, endpoint, body)  # warm a connection
            cpu0 = cpu() if cpu else 0.0
            start = time.perf_counter()
            deadline = start + seconds

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    results.append(await _one_stream(session, endpoint, body))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return results, time.perf_counter() - start, (cpu() - cpu0) if cpu else 0.0

    results, elapsed, cpu_used = _run(run())
    chunks = sum(s.chunks for s in results)
    extra = {"chunks_per_s": chunks / elapsed}
    if cpu and cpu_used > 0:
        extra["chunks_per_cpu_s"] = chunks / cpu_used
    return _of_streams(results, elapsed, extra)


def open_streams(endpoint: Endpoint, body: bytes, count: int, rss: Callable[[], int] | None) -> Measured:
    """`count` streams opened at once and held open (the upstream trickles one
    chunk a second); the target's resident memory is read once all are open."""

    async def run() -> tuple[list[_Stream], float, int]:
        async with _session(count) as session:
            start = time.perf_counter()
            tasks = [asyncio.create_task(_one_stream(session, endpoint, body)) for _ in range(count)]
            peak = 0
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.5)
                if rss:
                    peak = max(peak, rss())
            return [t.result() for t in tasks], time.perf_counter() - start, peak

    results, elapsed, peak = _run(run())
    return _of_streams(results, elapsed, {"peak_rss_mb": peak / 2**20} if rss else {})


# Connections the fixed-rate client may hold open at once. A target that falls
# behind would otherwise make it open one per waiting request until the process
# runs out of file descriptors; past this, requests wait for a connection, and
# since latency counts from the scheduled send, that wait is measured too.
MAX_OPEN = 4000


def fixed_rate(endpoint: Endpoint, body: bytes, rate: float, seconds: float, rss: Callable[[], int] | None,
               cpu: Callable[[], float] | None = None, timeout: float = 120) -> Measured:  # fmt: skip
    """Open loop: one request every 1/rate seconds whatever the answers do (as
    the published gateway benchmark offers its load), each given `timeout`.
    Sustained throughput is answers with 200 over the offered duration (all
    30,000 of 500/s for 60 s answered is 500/s; the drain after the last send
    is reported beside it); latency counts from each request's scheduled send
    time, so a client falling behind cannot hide the gateway's queueing.

    Where the cores went is reported too (busy cores over the run): the
    target's process, this client, and the whole machine (the rest is the
    upstream and everything else), since all of them share the same cores."""

    settled: list[float] = []  # answers to requests sent after the first 10 s (connections warm)

    async def run() -> tuple[list[float], int, float, int]:
        latencies: list[float] = []
        failed = 0
        headers = {**endpoint.headers, "content-type": "application/json"}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_OPEN),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as session:

            async def one(scheduled: float) -> None:
                nonlocal failed
                try:
                    async with session.post(endpoint.url, data=body, headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            latencies.append((time.perf_counter() - scheduled) * 1000)
                            if scheduled - start >= 10:
                                settled.append(latencies[-1])
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                failed += 1

            peak = 0
            sampler_stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not sampler_stop.is_set():
                    if rss:
                        peak = max(peak, rss())
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            start = time.perf_counter()
            total = int(rate * seconds)
            tasks = []
            for i in range(total):
                scheduled = start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(scheduled)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
            sampler_stop.set()
            await sampler
            return latencies, failed, elapsed, peak

    before = (time.perf_counter(), time.process_time(), procs.machine_busy_seconds(), cpu() if cpu else 0.0)
    latencies, failed, elapsed, peak = _run(run())
    wall = time.perf_counter() - before[0]
    extra = {"offered_rps": rate, "drain_s": max(0.0, elapsed - seconds),
             "p99_after_10s_ms": percentile(settled, 0.99) or 0.0,
             "client_cores": (time.process_time() - before[1]) / wall,
             "machine_cores": (procs.machine_busy_seconds() - before[2]) / wall}  # fmt: skip
    if cpu:
        extra["target_cores"] = (cpu() - before[3]) / wall
    if rss:
        extra["peak_rss_mb"] = peak / 2**20
    return _measured(latencies, failed, seconds, extra)


def _run(coro):  # type: ignore[no-untyped-def]
    """Run one scenario's client. Python's collector is kept out of its way:
    a full collection over 30,000 requests' tasks paused this client for up
    to 145 ms, which a fixed-rate client counts as latency of every target."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()

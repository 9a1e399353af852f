"""The engine client's own cost: the gateway's forwarder (gateway/engine_http.py)
against aiohttp's ClientSession (what it replaced), one keep-alive call at a
time to the fast upstream, in one run, alternating rounds.

Prints, per client, the wall time and this process's CPU time per call (the
upstream runs in its own process, so the CPU time is the client's alone).

    .venv/bin/python bench/engine_client.py [--calls 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.suite import targets  # noqa: E402
from gateway.audit.record import new_request_id  # noqa: E402
from gateway.forward import Forwarder, Upstream  # noqa: E402

BODY = b'{"model":"bench","messages":[{"role":"user","content":"Hello there"}],"max_tokens":16}'
PATH = "/v1/chat/completions"


async def measure(call: Callable[[], Awaitable[bytes]], calls: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call."""
    await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    return 1000 * (time.perf_counter() - wall) / calls, 1000 * (time.process_time() - cpu) / calls


async def run(url: str, calls: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    upstream = Upstream(url, "none")
    forwarder = Forwarder(connect_timeout=5, read_timeout=60, pool_size=16, keepalive=4, max_answer_bytes=1 << 28)
    # aiohttp as the forwarder had it configured.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=16, keepalive_timeout=4),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
    headers = {"authorization": "Bearer none", "content-type": "application/json"}

    async def ours() -> bytes:
        return (await forwarder.post(upstream, PATH, BODY, new_request_id()))[1]

    async def theirs() -> bytes:
        async with session.post(url + PATH, data=BODY, headers=headers) as r:
            return await r.read()

    assert await ours() == await theirs()
    results: dict[str, list[tuple[float, float]]] = {"forwarder (engine_http)": [], "aiohttp": []}
    try:
        for i in range(rounds):
            order = [("forwarder (engine_http)", ours), ("aiohttp", theirs)]
            for name, call in order if i % 2 == 0 else reversed(order):
                results[name].append(await measure(call, calls))
    finally:
        await forwarder.close()
        await session.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-engine-client-"))
    fast, proc = targets.fast_upstream(work)
    try:
        results = uvloop.run(run(fast.url, args.calls, args.rounds))
    finally:
        proc.stop()
    print(f"{args.calls} calls x {args.rounds} rounds, medians of the rounds")
    print("| client | wall ms per call | client CPU ms per call |")
    print("| --- | ---: | ---: |")
    for name, rows in results.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()

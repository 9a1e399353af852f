"""Added latency and throughput ratio: the gateway against the engine called directly.

With --upstream vllm (the default) one run starts a real vLLM CPU engine (tiny
random model, built on the spot); with --upstream fast, bench/fast_upstream.py,
which answers at once, so that what is added is the gateway's own cost. Also
a gateway (`bastion serve`, SQLite, strict audit: the intent record is committed
before the engine sees the call, and on disk with the final record before the
answer returns), and sends the same chat load to both, alternating rounds so machine
noise hits both alike. Prints p50/p99 latency, added latency, and the
throughput ratio at each concurrency.

    .venv/bin/python bench/gateway_overhead.py [--upstream vllm|fast] [--requests 400] [--concurrency 1 32]
        [--policy bench/policy-realistic.yaml] [--rate-limits memory|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.local import LocalEngine, LocalEngineConfig  # noqa: E402
from engine.spec import EngineSpec  # noqa: E402
from gateway import migrate  # noqa: E402
from tests.support import EngineRef, Gateway, bastion, free_port, write_config  # noqa: E402

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 8}


@dataclass
class Result:
    latencies: list[float]
    seconds: float

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


async def load(url: str, key: str, requests: int, concurrency: int, body: dict | None = None) -> Result:
    latencies: list[float] = []
    headers = {"authorization": f"Bearer {key}"}
    payload = json.dumps(body or BODY).encode()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        counter = iter(range(requests))

        async def worker() -> None:
            for _ in counter:
                t = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", content=payload,
                                      headers={**headers, "content-type": "application/json"})  # fmt: skip
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")

        # Warm the connections first.
        await asyncio.gather(*(client.post(url + "/v1/chat/completions", content=payload,
                                           headers={**headers, "content-type": "application/json"})
                               for _ in range(concurrency)))  # fmt: skip
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result(latencies, time.perf_counter() - start)


def merge(results: list[Result]) -> Result:
    return Result([x for r in results for x in r.latencies], sum(r.seconds for r in results))


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def upstream(kind: str, ref: EngineRef, work: Path, engine_python: str) -> Iterator[None]:
    """The real vLLM CPU engine, or bench/fast_upstream.py (answers at once)."""
    if kind == "fast":
        port = ref.url.rsplit(":", 1)[1]
        fast = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--port", port])
        try:
            wait_for(ref.url + "/health")
            yield
        finally:
            fast.terminate()
            fast.wait()
        return
    model = work / "tiny"
    build = [engine_python, str(ROOT / "engine" / "build_tiny.py"), str(model)]
    subprocess.run(build, check=True, capture_output=True)
    spec = EngineSpec(max_model_len=512, dtype="bfloat16")
    engine = LocalEngine(LocalEngineConfig("tiny", engine_python, model, ref.url, ref.key, spec, work / "engine.log"))
    engine.start()
    try:
        engine.wait_healthy(600)
        yield
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=["vllm", "fast"], default="vllm")
    parser.add_argument("--requests", type=int, default=400, help="requests per side per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per side")
    parser.add_argument("--engine-python", default=str(ROOT / ".venv-engine" / "bin" / "python"))
    parser.add_argument("--policy", help="policy file for the gateway (default: every team may call everything)")
    parser.add_argument("--rate-limits", choices=["memory", "redis"], default="memory")
    args = parser.parse_args()
    extra = {"policy": Path(args.policy).read_text()} if args.policy else {}

    work = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    ref = EngineRef("tiny", f"http://127.0.0.1:{free_port()}", secrets.token_urlsafe(24))
    gw: Gateway | None = None
    with upstream(args.upstream, ref, work, args.engine_python):
        try:
            port = free_port()
            db_url = f"sqlite+aiosqlite:///{work / 'gw' / 'state' / 'bastion.db'}"
            config = write_config(  # also creates gw/state
                work / "gw",
                port=port,
                database_url=db_url,
                engines=[ref],
                gateway={"engine_pool_size": 512},
                policy_settings={
                    "rate_limits": {"backend": args.rate_limits, "key_prefix": f"bench-{secrets.token_hex(4)}"}
                },
                **extra,
            )
            migrate.upgrade(db_url)
            gw = Gateway(config=config, port=port, database_url=db_url).start()
            created = bastion("keys", "create", "--config", str(config), "--name", "bench", "--json")
            key = json.loads(created.stdout)["key"]
            report(args, ref, gw, key)
        finally:
            if gw is not None:
                gw.stop()


def report(args: argparse.Namespace, ref: EngineRef, gw: Gateway, key: str) -> None:
    print(f"upstream: {args.upstream}; requests per side per level: {args.requests}; rounds: {args.rounds}")
    print(f"{'conc':>5} {'direct p50':>11} {'gw p50':>9} {'added p50':>10} {'direct p99':>11} {'gw p99':>9} "
          f"{'added p99':>10} {'direct rps':>11} {'gw rps':>9} {'ratio':>7}")  # fmt: skip
    per_round = max(1, args.requests // args.rounds)
    for conc in args.concurrency:
        direct: list[Result] = []
        through: list[Result] = []
        for _ in range(args.rounds):
            direct.append(asyncio.run(load(ref.url, ref.key, per_round, conc)))
            through.append(asyncio.run(load(gw.url, key, per_round, conc)))
        d, g = merge(direct), merge(through)
        print(f"{conc:>5} {d.pct(.5):>9.2f}ms {g.pct(.5):>7.2f}ms {g.pct(.5) - d.pct(.5):>8.2f}ms "
              f"{d.pct(.99):>9.2f}ms {g.pct(.99):>7.2f}ms {g.pct(.99) - d.pct(.99):>8.2f}ms "
              f"{d.rps:>11.1f} {g.rps:>9.1f} {g.rps / d.rps:>7.3f}")  # fmt: skip
    records = gw.records()
    finals = [r for r in records if r["phase"] == "final"]
    print(f"audit: {len(finals)} final records, {len(records) - len(finals)} intent records, "
          f"median gateway-side latency {statistics.median(r['latency_ms'] for r in finals):.2f}ms")  # fmt: skip


if __name__ == "__main__":
    main()

"""Stream relay: time to first token and chunks per second, through the
gateway against the engine called directly, in one run.

Starts the real vLLM CPU engine (tiny random model) and a gateway in front of
it (`bastion serve`, SQLite, strict audit: a stream's intent record is on
disk before the engine sees the call), then streams the same chat request (`ignore_eos`,
so every stream is `--tokens` chunks long) directly and through the gateway,
alternating rounds so machine noise hits both alike. Time to first token is
measured to the first chunk with generated text (content or reasoning; vLLM's
opening chunk carries only the role).

    .venv/bin/python bench/stream_relay.py [--streams 200] [--tokens 128] [--concurrency 1 8] [--audit-mode relaxed]
        [--upstream fast | --engine-url URL --engine-key-file FILE --model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_overhead import upstream  # noqa: E402

from gateway import migrate  # noqa: E402
from tests.support import EngineRef, Gateway, bastion, free_port, write_config  # noqa: E402


@dataclass
class Side:
    ttft: list[float] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    def add(self, other: Side) -> None:
        self.ttft += other.ttft
        self.chunks += other.chunks
        self.seconds += other.seconds


async def streams(url: str, key: str, count: int, concurrency: int, tokens: int, model: str = "tiny") -> Side:
    side = Side()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count to a hundred."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        todo = iter(range(count))

        async def one() -> None:
            t0 = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and has_token(line):
                        side.chunks += 1
                        if first is None:
                            first = time.perf_counter() - t0
            side.ttft.append(first if first is not None else float("nan"))

        async def worker() -> None:
            for _ in todo:
                await one()

        await one()  # warm the connection
        side.ttft.clear()
        side.chunks = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        side.seconds = time.perf_counter() - start
    return side


def has_token(line: str) -> bool:
    """Whether an SSE data line carries generated text (not the opening role chunk, not usage)."""
    choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content"))


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="streams per side per concurrency level")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--engine-python", default=str(ROOT / ".venv-engine" / "bin" / "python"))
    parser.add_argument("--audit-mode", choices=["strict", "relaxed"], default="strict")
    parser.add_argument("--engine-url", help="use this running engine instead of starting one")
    parser.add_argument("--engine-key-file", help="its API key (with --engine-url)")
    parser.add_argument("--model", default="tiny", help="its served model name (with --engine-url)")
    parser.add_argument("--upstream", choices=["vllm", "fast"], default="vllm",
                        help="fast: bench/fast_upstream.py (--tokens chunks a stream, no model work)")  # fmt: skip
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bastion-relay-"))
    if args.engine_url:  # an engine already running (e.g. on the GPU machine, from bench/gpu/run.sh)
        ref = EngineRef(args.model, args.engine_url, Path(args.engine_key_file).read_text().strip())
        running: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        ref = EngineRef("tiny", f"http://127.0.0.1:{free_port()}", secrets.token_urlsafe(24))
        running = upstream(args.upstream, ref, work, args.engine_python)
    with running:
        port = free_port()
        db_url = f"sqlite+aiosqlite:///{work / 'gw' / 'state' / 'bastion.db'}"
        config = write_config(
            work / "gw", port=port, database_url=db_url, engines=[ref], audit={"mode": args.audit_mode}
        )
        migrate.upgrade(db_url)
        gw = Gateway(config=config, port=port, database_url=db_url).start()
        try:
            key = json.loads(bastion("keys", "create", "--config", str(config), "--name", "bench", "--json").stdout)[
                "key"
            ]
            print(f"streams per side per level: {args.streams}; {args.tokens} tokens each; rounds: {args.rounds}")
            print(f"{'conc':>5} {'direct ttft p50':>16} {'gw ttft p50':>12} {'added':>8} {'direct ttft p99':>16} "
                  f"{'gw ttft p99':>12} {'direct chunks/s':>16} {'gw chunks/s':>12} {'ratio':>6}")  # fmt: skip
            for conc in args.concurrency:
                direct, through = Side(), Side()
                per_round = max(1, args.streams // args.rounds)
                for _ in range(args.rounds):
                    direct.add(asyncio.run(streams(ref.url, ref.key, per_round, conc, args.tokens, ref.name)))
                    through.add(asyncio.run(streams(gw.url, key, per_round, conc, args.tokens, ref.name)))
                d50, g50 = pct(direct.ttft, 0.5), pct(through.ttft, 0.5)
                dcs, gcs = direct.chunks / direct.seconds, through.chunks / through.seconds
                print(f"{conc:>5} {d50:>14.2f}ms {g50:>10.2f}ms {g50 - d50:>6.2f}ms {pct(direct.ttft, .99):>14.2f}ms "
                      f"{pct(through.ttft, .99):>10.2f}ms {dcs:>16.0f} {gcs:>12.0f} {gcs / dcs:>6.3f}")  # fmt: skip
            finals = [r for r in gw.records() if r["phase"] == "final"]
            print(f"audit: {len(finals)} final records; median completion tokens "
                  f"{statistics.median(r['completion_tokens'] or 0 for r in finals)}")  # fmt: skip
        finally:
            gw.stop()


if __name__ == "__main__":
    main()

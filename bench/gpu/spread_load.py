"""Throughput of several targets (the engine directly, gateways in front of it)
under the same closed-loop load, in rounds that take turns, from several
processes at once.

One httpx client measures itself, not a GPU engine, at high concurrency (at
256 connections it made 43 req/s against an engine that answers 190), so the
connections are spread over `--procs` processes of `concurrency / procs`
each (bench/gateway_overhead.py's load), and a round's throughput is its
requests over its slowest process's time. The first target is the baseline:
each other's ratio is its requests per second over all rounds against the
baseline's.

    python bench/gpu/spread_load.py --target direct http://127.0.0.1:8100 ENGINE_KEY \\
        --target bastion http://127.0.0.1:8000 API_KEY [--concurrency 256] [--procs 8] \\
        [--requests 2048] [--rounds 4] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gateway_overhead import Result, load  # noqa: E402


def _one(job: tuple[str, str, int, int, dict[str, Any]]) -> tuple[list[float], float]:
    url, key, requests, concurrency, body = job
    result = asyncio.run(load(url, key, requests, concurrency, body))
    return result.latencies, result.seconds


def one_round(url: str, key: str, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, float]:
    jobs = [(url, key, args.requests // args.procs, args.concurrency // args.procs, body)] * args.procs
    with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
        results = pool.map(_one, jobs)
    # The processes ran side by side: the round took as long as the slowest.
    merged = Result([x for lat, _ in results for x in lat], max(s for _, s in results))
    return {
        "requests": len(merged.latencies),
        "seconds": merged.seconds,
        "rps": merged.rps,
        "p50_ms": merged.pct(0.5),
        "p99_ms": merged.pct(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", nargs=3, action="append", metavar=("NAME", "URL", "KEY"), required=True)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2048, help="per target and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    body = {"model": args.model, "messages": [{"role": "user", "content": "Write about the sea."}],
            "max_tokens": args.max_tokens, "ignore_eos": True}  # fmt: skip
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        # Each round starts with a different target, so no one always follows another.
        order = args.target[r % len(args.target) :] + args.target[: r % len(args.target)]
        done = {name: one_round(url, key, args, body) for name, url, key in order}
        rounds.append(done)
        print(f"round {r + 1}: " + ", ".join(f"{n} {done[n]['rps']:.1f} req/s p50 {done[n]['p50_ms']:.0f} ms"
                                              for n, _, _ in args.target), flush=True)  # fmt: skip
    base = args.target[0][0]
    total = {n: sum(x[n]["requests"] for x in rounds) / sum(x[n]["seconds"] for x in rounds) for n, _, _ in args.target}
    summary = {
        n: {"rps": total[n], "ratio": total[n] / total[base],
            "round_ratios": [x[n]["rps"] / x[base]["rps"] for x in rounds],
            "p50_ms": statistics.median(x[n]["p50_ms"] for x in rounds)}
        for n, _, _ in args.target
    }  # fmt: skip
    for n, s in summary.items():
        spread = ", ".join(f"{q:.3f}" for q in sorted(s["round_ratios"]))
        print(f"{n}: {s['rps']:.1f} req/s over {args.rounds} rounds, {s['ratio']:.3f} of {base} (rounds: {spread})")
    if args.json:
        args.json.write_text(json.dumps({"concurrency": args.concurrency, "rounds": rounds, "summary": summary}))


if __name__ == "__main__":
    main()

"""What Bastion adds to one call at a time, measured in pairs: each direct
call to the engine is followed (or preceded, alternately) by the same call
through Bastion, and the added latency is the median of the pairs'
differences.

Against the real vLLM CPU engine, the engine's own latency drifts by more
than the gateway's cost from one round of calls to the next (the suite's
rounds: tens of percent within minutes), so comparing two rounds' p50s
measures the drift. Two calls a few milliseconds apart see the same engine;
their difference is the gateway's.

    .venv/bin/python -m bench.suite.paired [--pairs 1000] [--upstream vllm|fast [--delay-ms 30]] [--shared-cores]

As in the suite: vLLM CPU with the tiny random model, its OpenMP threads on
the last core and everything else on the others (`--shared-cores`: no
pinning); Bastion as `bastion serve` on SQLite with strict audit and the
suite's policy. The client is Python's http.client on keep-alive connections,
the same for both sides, so its own cost cancels out in each difference.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.suite import load, procs, targets
from bench.suite.scenarios import chat
from bench.suite.targets import ROOT, Endpoint


class Client:
    """One keep-alive connection, one POST at a time; returns the seconds it took."""

    def __init__(self, endpoint: Endpoint, body: bytes):
        url = urlsplit(endpoint.url)
        self._conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        self._path = url.path
        self._headers = {**endpoint.headers, "content-type": "application/json"}
        self._body = body

    def call(self) -> float:
        start = time.perf_counter()
        self._conn.request("POST", self._path, self._body, self._headers)
        response = self._conn.getresponse()
        response_body = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200 or not response_body:
            raise RuntimeError(f"{self._path}: {response.status} {response_body[:200]!r}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--upstream", choices=["vllm", "fast"], default="vllm")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the fast upstream waits before answering")
    parser.add_argument("--engine-python", default=str(ROOT / ".venv-engine" / "bin" / "python"))
    parser.add_argument("--shared-cores", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-paired-"))
    cores = sorted(os.sched_getaffinity(0))
    engine_cpus = {cores[-1]}
    stop = []
    try:
        if args.upstream == "vllm":
            upstream, engine = targets.vllm_upstream(
                work, args.engine_python, None if args.shared_cores else engine_cpus
            )
            stop.append(engine.stop)
            model = "tiny"
        else:
            upstream, proc = targets.fast_upstream(work, delay=args.delay_ms / 1000)
            stop.append(proc.stop)
            model = "bench"
        bastion = targets.bastion([upstream], work)
        stop.append(bastion.stop)
        if args.upstream == "vllm" and not args.shared_cores:
            others = set(cores) - engine_cpus
            os.sched_setaffinity(0, others)
            assert bastion.proc is not None
            procs.set_affinity(bastion.proc.pid, others)
        body = chat(model)
        direct = Client(targets.direct().endpoint(upstream), body)
        gateway = Client(bastion.endpoint(upstream), body)
        for _ in range(args.warmup):
            direct.call()
            gateway.call()
        d: list[float] = []
        g: list[float] = []
        for i in range(args.pairs):
            if i % 2 == 0:
                d.append(direct.call())
                g.append(gateway.call())
            else:
                g.append(gateway.call())
                d.append(direct.call())
    finally:
        for fn in reversed(stop):
            fn()
    added = [1000 * (b - a) for a, b in zip(d, g, strict=True)]
    ms = [1000 * x for x in d], [1000 * x for x in g]
    cores_note = "shared cores" if args.shared_cores or args.upstream == "fast" else "the engine on a core of its own"
    delay = f", answering after {args.delay_ms:g} ms" if args.upstream == "fast" and args.delay_ms else ""
    print(f"{args.pairs} pairs, upstream {args.upstream}{delay}, {cores_note}")
    print("| | p50 ms | p90 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in (("direct", ms[0]), ("bastion", ms[1]), ("added (per pair)", added)):
        p50, p90, p99 = (load.percentile(values, q) or 0.0 for q in (0.5, 0.9, 0.99))
        print(f"| {name} | {p50:.2f} | {p90:.2f} | {p99:.2f} |")
    quarter = len(added) // 4
    quarters = [statistics.median(added[i * quarter : (i + 1) * quarter]) for i in range(4)]
    print("added p50 by quarter of the run: " + ", ".join(f"{q:.2f}" for q in quarters) + " ms")


if __name__ == "__main__":
    main()

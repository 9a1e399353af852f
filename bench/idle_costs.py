"""What an idle gap costs on this machine: the same operations run back to back
and after the process slept, in one run.

Against the fast upstream, a call through the gateway costs about 1.3 ms more
than one straight to the upstream; against an upstream that answers after
30 ms (vLLM, or the fast upstream with a delay), about 3 ms. Nothing in the
gateway's path depends on how long the upstream took, so the difference is
what the machine charges for work done right after sleeping. This measures
the three kinds of work a call does once its engine has answered:

- a 4 KB `pwrite` and `fdatasync` (the final audit record's commit);
- a round trip over a socket pair to another process (a wake-up each way);
- about 0.8 ms of Python (JSON and SHA-256, like the final record's).

For each gap it prints the p50 and its ratio to the back-to-back p50.

    .venv/bin/python bench/idle_costs.py [--dir /path/on/the/database/disk] [--samples 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

GAPS_MS = (0, 1, 3, 10, 30, 100)


def _sync(fd: int) -> Callable[[], None]:
    page = b"a" * 4096

    def run() -> None:
        os.pwrite(fd, page, 0)
        os.fdatasync(fd)

    return run


def _round_trip(sock: socket.socket) -> Callable[[], None]:
    def run() -> None:
        sock.send(b"x")
        sock.recv(1)

    return run


def _python() -> None:
    data = {"a": list(range(50)), "b": "x" * 500}
    for _ in range(40):
        text = json.dumps(data)
        json.loads(text)
        hashlib.sha256(text.encode()).hexdigest()


def p50_us(op: Callable[[], None], gap_s: float, samples: int) -> float:
    times = []
    for _ in range(samples):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        op()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the synced file goes")
    parser.add_argument("--samples", type=int, default=200, help="per operation and gap (fewer for gaps over 10 ms)")
    args = parser.parse_args()

    ours, echo = socket.socketpair()
    child = os.fork()
    if child == 0:  # the other process: echoes each byte back
        ours.close()
        while echo.recv(1):
            echo.send(b"x")
        os._exit(0)
    echo.close()
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="idle-costs-")
    os.write(fd, b"\0" * 4096)
    ops = {"pwrite + fdatasync": _sync(fd), "socket round trip": _round_trip(ours), "0.8 ms of Python": _python}
    try:
        print(f"| operation | {' | '.join(f'gap {g} ms' for g in GAPS_MS)} |")
        print(f"| --- | {' | '.join('---:' for _ in GAPS_MS)} |")
        for name, op in ops.items():
            cells, base = [], 0.0
            for gap in GAPS_MS:
                n = args.samples if gap <= 10 else max(30, args.samples // 5)
                us = p50_us(op, gap / 1000, n)
                base = base or us
                cells.append(f"{us:,.0f} µs ({us / base:.1f}x)")
            print(f"| {name} | {' | '.join(cells)} |", flush=True)
    finally:
        ours.close()
        os.waitpid(child, 0)
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()

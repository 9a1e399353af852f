"""Two revisions of Bastion side by side, in one run: this working tree against
an earlier commit, each as `bastion serve` in front of the same fast upstream,
with wrk (closed loop) taking turns between direct, one and the other.

    .venv/bin/python -m bench.suite.ab --base d84f25e [--rounds 8] [--seconds 5] [--connections 1]

The earlier commit is checked out into a temporary git worktree and run with
the same interpreter and dependencies (bench/.peers/bastion when set up), its
tree first on PYTHONPATH. What is printed per side: added latency over direct
(medians of the rounds' p50 and p99), the gateway's CPU time per call (every
thread, from /proc), and requests per second. Rounds alternate the order of
the two gateways, so the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.suite import load, procs, targets
from bench.suite.scenarios import chat
from bench.suite.targets import ROOT, Target, Upstream


def alternate(sides: dict[str, Target], upstream: Upstream, *, rounds: int, seconds: float, connections: int) -> str:
    """wrk in turns against the upstream directly and each side; the table of
    each side's added latency, CPU per call and throughput (Markdown)."""
    direct = targets.direct()
    body = chat(upstream.models[0])
    for t in sides.values():
        load.wrk(t.endpoint(upstream), body, connections, 2)  # warm the pools
    runs: dict[str, list[load.Measured]] = {name: [] for name in ["direct", *sides]}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds):
        names = list(sides)
        order = names if i % 2 == 0 else names[::-1]
        for name in ["direct", *order]:
            target = direct if name == "direct" else sides[name]
            before = procs.cpu_seconds(target.proc.pid) if target.proc else 0.0
            m = load.wrk(target.endpoint(upstream), body, connections, seconds)
            runs[name].append(m)
            if target.proc:
                cpu[name].append(1000 * (procs.cpu_seconds(target.proc.pid) - before) / max(m.requests, 1))
    d50 = statistics.median(m.p50_ms for m in runs["direct"])
    d99 = statistics.median(m.p99_ms for m in runs["direct"])
    rows = ["| side | added p50 ms | added p99 ms | CPU ms per call | req/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in sides:
        p50 = statistics.median(m.p50_ms for m in runs[name]) - d50
        p99 = statistics.median(m.p99_ms for m in runs[name]) - d99
        rps = statistics.median(m.requests / m.seconds for m in runs[name])
        rows.append(f"| {name} | {p50:.3f} | {p99:.3f} | {statistics.median(cpu[name]):.3f} | {rps:,.0f} |")
    return "\n".join(rows)


def round_options(parser: argparse.ArgumentParser) -> None:
    """The options of `alternate`."""
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit")
    round_options(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-ab-"))
    tree = work / "base-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.base], check=True)
    fast, fast_proc = targets.fast_upstream(work)
    sides: dict[str, Target] = {}
    try:
        (work / "base").mkdir()
        (work / "head").mkdir()
        # The earlier tree first on the path: its `gateway` package is the one imported.
        base_env = {**os.environ, "PYTHONPATH": str(tree)}
        sides = {
            "base": targets.bastion([fast], work / "base", env=base_env),
            "head": targets.bastion([fast], work / "head"),
        }
        table = alternate(sides, fast, rounds=args.rounds, seconds=args.seconds, connections=args.connections)
        print(f"c={args.connections}, {args.rounds} rounds of {args.seconds:g} s; base {args.base} against this tree")
        print(table)
    finally:
        for t in sides.values():
            t.stop()
        fast_proc.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()

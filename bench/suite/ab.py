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
from bench.suite.targets import ROOT, Target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=1)
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
        direct = targets.direct()
        body = chat("bench")
        for t in sides.values():
            load.wrk(t.endpoint(fast), body, args.connections, 2)  # warm the pools
        runs: dict[str, list[load.Measured]] = {"direct": [], "base": [], "head": []}
        cpu: dict[str, list[float]] = {"base": [], "head": []}
        for i in range(args.rounds):
            order = ["base", "head"] if i % 2 == 0 else ["head", "base"]
            for name in ["direct", *order]:
                target = direct if name == "direct" else sides[name]
                before = procs.cpu_seconds(target.proc.pid) if target.proc else 0.0
                m = load.wrk(target.endpoint(fast), body, args.connections, args.seconds)
                runs[name].append(m)
                if target.proc:
                    cpu[name].append(1000 * (procs.cpu_seconds(target.proc.pid) - before) / max(m.requests, 1))
        d50 = statistics.median(m.p50_ms for m in runs["direct"])
        d99 = statistics.median(m.p99_ms for m in runs["direct"])
        print(f"c={args.connections}, {args.rounds} rounds of {args.seconds:g} s; base {args.base} against this tree")
        print("| side | added p50 ms | added p99 ms | CPU ms per call | req/s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in ("base", "head"):
            p50 = statistics.median(m.p50_ms for m in runs[name]) - d50
            p99 = statistics.median(m.p99_ms for m in runs[name]) - d99
            rps = statistics.median(m.requests / m.seconds for m in runs[name])
            print(f"| {name} | {p50:.3f} | {p99:.3f} | {statistics.median(cpu[name]):.3f} | {rps:,.0f} |")
    finally:
        for t in sides.values():
            t.stop()
        fast_proc.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()

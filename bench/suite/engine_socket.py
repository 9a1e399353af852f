"""The engine behind a Unix socket against behind loopback TCP, in one run:
two Bastions, identical but for their `engine_url`, in front of the same fast
upstream (listening on both), with wrk (closed loop) taking turns between
direct (TCP), one and the other.

    .venv/bin/python -m bench.suite.engine_socket [--rounds 8] [--seconds 5] [--connections 1]

Prints each side's added latency over direct (medians of the rounds' p50 and
p99), its CPU time per call, and requests per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bench.suite import targets
from bench.suite.ab import alternate, round_options
from bench.suite.targets import Target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    round_options(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bastion-socket-"))
    sock = work / "upstream.sock"
    fast, fast_proc = targets.fast_upstream(work, unix_socket=sock)
    sides: dict[str, Target] = {}
    try:
        sides = {
            "engine over TCP": targets.bastion([fast], work / "tcp"),
            "engine over a Unix socket": targets.bastion(
                [dataclasses.replace(fast, url=f"unix:{sock}")], work / "unix"
            ),
        }
        table = alternate(sides, fast, rounds=args.rounds, seconds=args.seconds, connections=args.connections)
        print(f"c={args.connections}, {args.rounds} rounds of {args.seconds:g} s")
        print(table)
    finally:
        for t in sides.values():
            t.stop()
        fast_proc.stop()


if __name__ == "__main__":
    main()

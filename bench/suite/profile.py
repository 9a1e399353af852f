"""Profile Bastion under one of the suite's scenarios with py-spy.

    .venv/bin/python -m bench.suite.profile "chat c=1" [--seconds 15] [--out bench/results/profile]

Starts the fast upstream and Bastion as the suite does, records the gateway
with py-spy (200 Hz, the thread holding the GIL) while the scenario runs, and
writes the collapsed stacks; then prints the functions
with the most samples, counted once per stack (inclusive) and at the top
(self time).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.suite import targets
from bench.suite.scenarios import SCENARIOS, Options
from bench.suite.targets import ROOT


def summarize(collapsed: Path, top: int = 30) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    rows = [f"{total} samples", "inclusive:"]
    rows += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    rows += ["self:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=[s.name for s in SCENARIOS if s.upstream == "fast"])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    scenario = next(s for s in SCENARIOS if s.name == args.scenario)
    work = Path(tempfile.mkdtemp(prefix="bastion-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / scenario.name.replace(" ", "_").replace("=", "")
    fast, fast_proc = targets.fast_upstream(work)
    bastion = targets.bastion([fast], work)
    try:
        assert bastion.proc is not None
        # --gil: samples of the thread holding the GIL only, so idle waits don't show.
        record = [py_spy, "record", "--pid", str(bastion.proc.pid), "--rate", "200", "--gil",
                  "--duration", str(int(args.seconds)), "--format", "raw", "--output", f"{stem}.txt"]  # fmt: skip
        spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        measured = scenario.run(bastion, fast, Options(args.seconds, 1000, 500, args.seconds))
        spy.wait(60)
    finally:
        bastion.stop()
        fast_proc.stop()
    print(f"{scenario.name}: {measured.rps:.1f} req/s, p50 {measured.p50_ms} ms, p99 {measured.p99_ms} ms")
    print(summarize(Path(f"{stem}.txt")))


if __name__ == "__main__":
    main()

"""Bastion against the engine called directly and against the gateways people use
today, in one run, on the same machine and the same upstreams; one table.

    bash bench/peers/setup.sh                 # once: LiteLLM's proxy and Portkey, each in its own environment
    .venv/bin/python -m bench.suite           # everything (about 20 minutes on 2 cores)
    .venv/bin/python -m bench.suite --quick   # shorter runs, same scenarios

The run happens in a network namespace of its own with only a loopback
interface (`unshare --net`), so nothing any process in it starts (a peer's
telemetry, say) can reach another address.

Upstreams: bench/fast_upstream.py (no model work: what is measured is the
gateway's own cost) and the real vLLM CPU engine with the tiny random model.
Bastion runs as `bastion serve` on SQLite with strict audit (each call's intent
record committed before it is forwarded, and on disk with its final record
before the answer returns; chained, checkpointed and signed) and a policy with content detectors
and rate limits on. After the scenarios, a leak run sends Bastion 100,000 more
requests and reads its memory as it goes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.suite import load, procs, report, targets
from bench.suite.scenarios import SCENARIOS, Options, chat
from bench.suite.targets import ROOT, Target, Upstream

_NETNS_FLAG = "BASTION_BENCH_NETNS"


def _isolate() -> None:
    """Re-run this command inside a fresh network namespace with only loopback."""
    if os.environ.get(_NETNS_FLAG) == "1":
        return
    unshare = shutil.which("unshare")
    if unshare is None:
        sys.exit("bench.suite: `unshare` (util-linux) is needed to isolate the run's network; --no-netns to skip")
    flags = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]
    inner = 'ip link set lo up && exec "$@"'
    argv = [unshare, *flags, "--", "sh", "-c", inner, "sh", sys.executable, "-m", "bench.suite", *sys.argv[1:]]
    os.execve(unshare, argv, {**os.environ, _NETNS_FLAG: "1"})


def _pin(cpus: set[int], on: list[Target]) -> None:
    """Put this process (and wrk, started from it) and every target on `cpus`."""
    os.sched_setaffinity(0, cpus)
    for target in on:
        if target.proc is not None:
            procs.set_affinity(target.proc.pid, cpus)


def leak_run(
    target: Target, upstream: Upstream, total: int, slice_seconds: float, warmup: int
) -> tuple[list[tuple[int, float]], float]:
    """Bastion's resident memory over `total` requests, read between wrk runs.

    Growth is counted from after `warmup` requests: by then the bounded
    caches (the audit writer's 16 MiB SQLite page cache fills as the table
    grows, the connection pools, the allocator's arenas) are full, so what
    still grows is what a leak would be. The series starts before the
    warm-up, so the chart shows the caches filling too.
    """
    assert target.proc is not None
    endpoint, body = target.endpoint(upstream), chat("bench")
    series = [(0, procs.rss_bytes(target.proc.pid) / 2**20)]
    done = 0
    while done < warmup:
        done += load.wrk(endpoint, body, 32, slice_seconds).requests
        series.append((done, procs.rss_bytes(target.proc.pid) / 2**20))
        print(f"  leak run, warm-up: {done:,} requests, {series[-1][1]:.1f} MB", flush=True)
    base = series[-1][1]
    total += done
    while done < total:
        m = load.wrk(endpoint, body, 32, slice_seconds)
        done += m.requests
        series.append((done, procs.rss_bytes(target.proc.pid) / 2**20))
        print(f"  leak run: {done:,} requests, {series[-1][1]:.1f} MB", flush=True)
    return series, (series[-1][1] - base) / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="5 s per scenario, 15 s of fixed rate, 20,000 leak requests"
    )
    parser.add_argument("--seconds", type=float, default=15, help="per closed-loop scenario and target")
    parser.add_argument("--peers", nargs="*", help="peer gateways to include (default: every one set up)")
    parser.add_argument("--only", nargs="*", help="run only the scenarios whose names start with these")
    parser.add_argument("--no-vllm", action="store_true", help="skip the scenarios on the real vLLM CPU engine")
    parser.add_argument("--leak-requests", type=int, help="requests in the leak run (default 100,000; 0 skips it)")
    parser.add_argument(
        "--bastion-workers",
        type=int,
        default=1,
        help="also run a Bastion with this many worker processes (limits in a Redis of the run's own)",
    )
    parser.add_argument("--open-streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=500, help="the published benchmark's offered requests/s")
    parser.add_argument("--rate-seconds", type=float, default=60)
    parser.add_argument("--engine-python", default=str(ROOT / ".venv-engine" / "bin" / "python"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--chart", type=Path, help="where to write the chart (default: OUT/suite-<time>.png)")
    parser.add_argument("--no-netns", action="store_true", help="run on the host's network namespace")
    parser.add_argument("--shared-cores", action="store_true",  # forced on a machine with one core
                        help="let vLLM share every core with the gateways and wrk (default: its own core)")  # fmt: skip
    args = parser.parse_args()
    # The chart is drawn last: say now, not after the whole run, that it cannot be.
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("the chart needs matplotlib: `make bench` installs it (pip install -e '.[bench]')")
    if not args.no_netns:
        _isolate()
    if args.quick:
        args.seconds, args.rate_seconds = 5, 15
    if args.leak_requests is None:
        args.leak_requests = 20_000 if args.quick else 100_000
    peers = targets.available_peers() if args.peers is None else args.peers
    scenarios = [s for s in SCENARIOS if not args.only or any(s.name.startswith(p) for p in args.only)]
    if args.no_vllm:
        scenarios = [s for s in scenarios if s.upstream != "vllm"]
    opts = Options(args.seconds, args.open_streams, args.rate, args.rate_seconds)

    # vLLM's CPU backend spins OpenMP threads on every core it has; a gateway
    # preempting one of them stalls the whole forward pass, so on a shared
    # machine the "through a gateway" side measures that contention. By
    # default the engine gets the last core, and for its scenarios everything
    # else (gateways, wrk, this client) is kept off it.
    cores = sorted(os.sched_getaffinity(0))
    engine_cpus = {cores[-1]}
    args.shared_cores = args.shared_cores or len(cores) < 2
    work = Path(tempfile.mkdtemp(prefix="bastion-suite-"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"suite-{stamp}.partial.json"  # after each scenario, in case the run dies
    print(
        f"work folder: {work}; peers: {', '.join(peers) or 'none'}; bastion: {targets.bastion_executable()}", flush=True
    )
    started: list[object] = []
    results: report.Results = {}
    leak: list[tuple[int, float]] = []
    growth: float | None = None
    try:
        fast, fast_proc = targets.fast_upstream(work)
        started.append(fast_proc)
        upstreams = [fast]
        if any(s.upstream == "vllm" for s in scenarios):
            print("starting vLLM CPU (tiny random model)...", flush=True)
            vllm, engine = targets.vllm_upstream(work, args.engine_python, None if args.shared_cores else engine_cpus)
            started.append(engine)
            upstreams.append(vllm)
        by_kind = {u.kind: u for u in upstreams}
        # All the load comes from this one address, and the published scenario
        # may hold up to load.MAX_OPEN connections while the open streams stay open.
        caps = load.MAX_OPEN + args.open_streams
        bastion = targets.bastion(upstreams, work, max_connections=caps)
        started.append(bastion)
        all_targets = [targets.direct(), bastion]
        if args.bastion_workers > 1:
            redis_url, redis_proc = targets.redis(work)
            started.append(redis_proc)
            several = targets.bastion(
                upstreams, work, workers=args.bastion_workers, redis_url=redis_url, max_connections=caps
            )
            all_targets.append(several)
            started.append(several)
        if "litellm" in peers:
            all_targets.append(targets.litellm(upstreams, work))
            started.append(all_targets[-1])
        if "portkey" in peers:
            all_targets.append(targets.portkey(work))
            started.append(all_targets[-1])
        for i, scenario in enumerate(scenarios):
            upstream = by_kind[scenario.upstream]
            if not args.shared_cores:
                _pin(set(cores) - engine_cpus if scenario.upstream == "vllm" else set(cores), all_targets)
            runs: dict[str, list[load.Measured]] = {t.name: [] for t in all_targets}
            for r in range(scenario.rounds):
                # The order turns from scenario to scenario and round to round,
                # so no target always runs first.
                turn = (i + r) % len(all_targets)
                for target in all_targets[turn:] + all_targets[:turn]:
                    print(f"{scenario.name}: {target.name}{_round(r, scenario.rounds)}...", flush=True)
                    try:
                        runs[target.name].append(scenario.run(target, upstream, opts))
                    except Exception as exc:  # one target failing a scenario is a result, not the end of the run
                        print(f"  {scenario.name} on {target.name} failed: {type(exc).__name__}: {exc}", flush=True)
                        runs[target.name].append(load.Measured(extra={"failed_run": 1.0}))
                    time.sleep(1)  # let the last connections close
            results[scenario.name] = {
                name: measured[0] if len(measured) == 1 else load.combined(measured) for name, measured in runs.items()
            }
            partial.write_text(json.dumps(report.as_json(results), indent=1))
        _pin(set(cores), all_targets)
        if args.leak_requests:
            leak, growth = leak_run(bastion, fast, args.leak_requests, 10, warmup=args.leak_requests // 4)
    finally:
        for thing in reversed(started):
            thing.stop()  # type: ignore[attr-defined]

    found = report.checks(results, growth)
    print()
    print(report.table(results))
    print()
    print(report.checks_table(found))
    meta = {"time": stamp, "machine": _machine(), "peers": _peer_versions(peers), "argv": sys.argv[1:]}
    data = {"meta": meta, "results": report.as_json(results), "leak": leak, "leak_growth": growth,
            "checks": [c.__dict__ for c in found]}  # fmt: skip
    (args.out / f"suite-{stamp}.json").write_text(json.dumps(data, indent=1))
    chart = args.chart or args.out / f"suite-{stamp}.png"
    report.chart(results, leak, chart)
    print(f"\nresults: {args.out / f'suite-{stamp}.json'}; chart: {chart}")


def _round(r: int, rounds: int) -> str:
    return f" (round {r + 1} of {rounds})" if rounds > 1 else ""


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")  # fmt: skip
    return f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"


def _peer_versions(peers: list[str]) -> dict[str, str]:
    versions = {}
    if "litellm" in peers:
        py = targets.PEERS / "litellm" / "bin" / "python"
        ask = "import importlib.metadata as m; print(m.version('litellm'))"
        versions["litellm"] = subprocess.run([str(py), "-c", ask], capture_output=True, text=True).stdout.strip()
    if "portkey" in peers:
        package = targets.PEERS / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "package.json"
        versions["portkey"] = json.loads(package.read_text())["version"]
    return versions


if __name__ == "__main__":
    main()

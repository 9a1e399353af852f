"""The processes a suite run starts: each in a session of its own (stopped by
its process group, never by name), with its resident memory and CPU time read
from /proc over the whole process tree (LiteLLM and vLLM start children)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import stop_group

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    """The process and all its descendants that are alive now."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def _over_tree(pid: int, name: str, value: Callable[[str], float]) -> float:
    """`value` of /proc/<p>/<name>, summed over the tree (processes that exit meanwhile count 0)."""
    total = 0.0
    for p in _tree(pid):
        try:
            total += value(Path(f"/proc/{p}/{name}").read_text())
        except OSError:
            continue
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of the process tree (sum of each process's RSS)."""
    return int(_over_tree(pid, "statm", lambda text: int(text.split()[1]) * _PAGE))


def _cpu(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process tree so far."""
    return _over_tree(pid, "stat", _cpu)


def machine_busy_seconds() -> float:
    """CPU time every core has spent not idle since boot (/proc/stat), in seconds."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / _TICKS


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin a process tree (every thread of every process) to `cpus`."""
    for p in _tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                continue


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        stop_group(self.popen)


def start(
    name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Proc:
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd
        )
    return Proc(name, popen, log)


def wait_http(proc: Proc, url: str, timeout: float = 120) -> None:
    """Wait until `url` answers at all (any status below 500)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited {proc.popen.returncode}; log: {proc.log}\n{proc.log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout:.0f} s; log: {proc.log}")

"""What the load is sent to: the upstream itself (direct), Bastion, and the peer
gateways, each started here in front of the same upstreams.

Every gateway is configured with every upstream model under the upstream's own
name, so one request body works for every target; only the URL and headers
differ. How each peer is configured is documented in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.suite import procs
from engine.local import LocalEngine

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "bench" / ".peers"
BASTION_DEV = str(Path(sys.executable).with_name("bastion"))


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible server the gateways forward to."""

    kind: str  # "fast" (bench/fast_upstream.py) or "vllm" (the real vLLM CPU engine)
    url: str  # without /v1
    key: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class Endpoint:
    url: str  # the chat completions URL
    headers: dict[str, str]


@dataclass
class Target:
    name: str
    proc: procs.Proc | None = None  # None for the upstream called directly
    key: str = ""
    base_url: str = ""

    def endpoint(self, upstream: Upstream) -> Endpoint:
        if self.proc is None:  # direct
            return Endpoint(upstream.url + "/v1/chat/completions", {"authorization": f"Bearer {upstream.key}"})
        if self.name == "portkey":
            # Portkey takes the provider, its address and its key from headers on each request.
            headers = {
                "authorization": f"Bearer {upstream.key}",
                "x-portkey-provider": "openai",
                "x-portkey-custom-host": upstream.url + "/v1",
            }
            return Endpoint(self.base_url + "/v1/chat/completions", headers)
        return Endpoint(self.base_url + "/v1/chat/completions", {"authorization": f"Bearer {self.key}"})

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def direct() -> Target:
    return Target("direct")


SUITE_POLICY = ROOT / "bench" / "suite" / "policy.yaml"


def bastion(
    upstreams: list[Upstream],
    work: Path,
    *,
    audit_mode: str = "strict",
    workers: int = 1,
    redis_url: str = "",
    max_connections: int | None = None,
    env: dict[str, str] | None = None,
) -> Target:
    """`bastion serve` on SQLite with strict audit (the intent committed before
    the call goes on, every record on disk before the answer returns), chained and checkpointed, and a
    policy with content detectors and rate limits switched on. With several
    workers the rate limits are held in Redis (`redis_url`), as they must be.
    `max_connections`: both connection caps, where the load (all from one
    address) holds more connections than the defaults allow.
    `env`: the gateway process's environment (default: this one's)."""
    from gateway import migrate
    from tests.support import EngineRef, free_port, write_config
    from tests.support import bastion as run_bastion

    name = "bastion" if workers == 1 else f"bastion x{workers}"
    limits = {"backend": "memory"} if workers == 1 else {"backend": "redis", "redis_url": redis_url}
    home = work / name.replace(" ", "-")
    port = free_port()
    db_url = f"sqlite+aiosqlite:///{home / 'state' / 'bastion.db'}"
    engines = [EngineRef(m, u.url, u.key) for u in upstreams for m in u.models]
    # Every open stream of the scenarios holds one engine connection.
    gateway: dict[str, object] = {"engine_pool_size": 4096, "workers": workers}
    if max_connections is not None:
        gateway.update(max_connections=max_connections, max_connections_per_client=max_connections)
    config = write_config(
        home,
        port=port,
        database_url=db_url,
        engines=engines,
        gateway=gateway,
        audit={"mode": audit_mode},
        policy=SUITE_POLICY.read_text(),
        policy_settings={"rate_limits": limits},
    )
    migrate.upgrade(db_url)
    created = run_bastion("keys", "create", "--config", str(config), "--name", "bench", "--team", "default", "--json")
    key = json.loads(created.stdout)["key"]
    proc = procs.start("bastion", [bastion_executable(), "serve", "--config", str(config)], home / "gateway.log", env)
    procs.wait_http(proc, f"http://127.0.0.1:{port}/healthz", 60)
    return Target(name, proc, key, f"http://127.0.0.1:{port}")


def bastion_executable() -> str:
    """`bastion` from bench/.peers/bastion/ (bench/peers/setup.sh): the gateway
    with its runtime dependencies only, as its image installs it. The project's
    .venv also holds the test dependencies, and Litestar loads its pydantic
    plugin whenever pydantic is installed (6-7 MB more resident). Falls back to
    .venv's when that environment is missing."""
    deployed = PEERS / "bastion" / "bin" / "bastion"
    return str(deployed) if deployed.exists() else BASTION_DEV


def redis(work: Path) -> tuple[str, procs.Proc]:
    """A Redis of the run's own (no persistence), for the limits of a Bastion with several workers."""
    from tests.support import free_port

    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = procs.start("redis", argv, work / "redis.log")
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"redis://127.0.0.1:{port}/0", proc
        except OSError:
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {proc.log.read_text()[-500:]}") from None
            time.sleep(0.1)


def litellm(upstreams: list[Upstream], work: Path, *, workers: int = 1) -> Target:
    """LiteLLM's proxy with a master key and no database: its fastest setup."""
    from tests.support import free_port

    home = work / "litellm"
    home.mkdir(parents=True, exist_ok=True)
    master = "sk-bench-" + secrets.token_hex(12)
    config = {
        "model_list": [
            {"model_name": m, "litellm_params": {"model": f"openai/{m}", "api_base": u.url + "/v1", "api_key": u.key}}
            for u in upstreams
            for m in u.models
        ],
        "general_settings": {"master_key": master},
        "litellm_settings": {"telemetry": False, "request_timeout": 600},
    }
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        # The cost map ships with the package; without this LiteLLM fetches it at start.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "NO_DOCS": "True",
    }
    argv = [str(PEERS / "litellm" / "bin" / "litellm"), "--config", str(home / "config.yaml"),
            "--host", "127.0.0.1", "--port", str(port), "--num_workers", str(workers)]  # fmt: skip
    proc = procs.start("litellm", argv, home / "litellm.log", env=env)
    procs.wait_http(proc, f"http://127.0.0.1:{port}/health/liveliness", 180)
    return Target("litellm", proc, master, f"http://127.0.0.1:{port}")


def portkey(work: Path) -> Target:
    """Portkey's open-source gateway on Node.js, headless (no console UI)."""
    from tests.support import free_port

    home = work / "portkey"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = PEERS / "portkey" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    node = shutil.which("node") or "node"
    env = {**os.environ, "NODE_ENV": "production"}
    proc = procs.start("portkey", [node, str(server), f"--port={port}", "--headless"], home / "portkey.log", env=env)
    procs.wait_http(proc, f"http://127.0.0.1:{port}/", 60)
    return Target("portkey", proc, "", f"http://127.0.0.1:{port}")


def available_peers() -> list[str]:
    found = []
    if (PEERS / "litellm" / ".done").exists():
        found.append("litellm")
    if (PEERS / "portkey" / ".done").exists() and shutil.which("node"):
        found.append("portkey")
    return found


def fast_upstream(work: Path, *, delay: float = 0.0, unix_socket: Path | None = None) -> tuple[Upstream, procs.Proc]:
    """bench/fast_upstream.py; `delay`: seconds before every answer; `unix_socket`:
    a path where it listens too (its URL stays the TCP one)."""
    from tests.support import free_port

    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--port", str(port), "--delay", str(delay)]
    if unix_socket is not None:
        argv += ["--unix", str(unix_socket)]
    proc = procs.start("fast-upstream", argv, work / "fast-upstream.log")
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(proc, url + "/health", 30)
    return Upstream("fast", url, "none", ("bench", "bench-slow", "bench-trickle")), proc


def vllm_upstream(work: Path, engine_python: str, cpus: set[int] | None = None) -> tuple[Upstream, LocalEngine]:
    """The real vLLM CPU engine serving the tiny random model, built here;
    with `cpus`, it runs on those cores only (its OpenMP threads bound to them)."""
    from engine.local import LocalEngineConfig
    from engine.spec import EngineSpec
    from tests.support import free_port

    model = work / "tiny"
    subprocess.run([engine_python, str(ROOT / "engine" / "build_tiny.py"), str(model)], check=True, capture_output=True)
    url, key = f"http://127.0.0.1:{free_port()}", secrets.token_urlsafe(24)
    bind = "auto" if cpus is None else ",".join(str(c) for c in sorted(cpus))
    spec = EngineSpec(max_model_len=512, dtype="bfloat16", cpu_threads_bind=bind)
    engine = LocalEngine(LocalEngineConfig("tiny", engine_python, model, url, key, spec, work / "engine.log"))
    if cpus is None:
        engine.start()
    else:
        # Children inherit the affinity they are started with; this process gets its own back.
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            engine.start()
        finally:
            os.sched_setaffinity(0, before)
    engine.wait_healthy(600)
    return Upstream("vllm", url, key, ("tiny",)), engine

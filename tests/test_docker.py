"""The compose deployment and the Docker SDK engine runner on a real Docker engine (issue 5).

Needs a running dockerd and the images of `docker/build-images.sh --local-base`
(the Makefile's `docker-images` step, which `make test` runs). Locally, skip
with `-m 'not docker'`.

One compose stack (gateway, CPU engine, PostgreSQL, all from local images) is
brought up for the module; the tests read it through the published port, the
Docker SDK and `docker exec`. The last one tears it down and checks that
nothing of the project is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.container import (
    ENGINE_UID,
    GATEWAY_UID,
    LOOPBACK_ONLY,
    SANDBOX,
    SOCKET_DIR,
    SOCKET_DIR_MODE,
    SOCKET_PATH,
    healthcheck,
)
from tests.support import bastion, free_port

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ["bastion-gateway:latest", "bastion-engine-cpu:latest", "bastion-postgres:latest", "bastion-base:bookworm"]


def run_in(container: Any, argv: list[str], **options: Any) -> tuple[int, str]:
    """`docker exec` argv in container: its exit status and its output (stdout and stderr).

    docker-py's exec_run can hand back no output, and no exit status, for a
    command that ends at once (docker/docker-py#2042: the daemon starts the
    command before the output stream is attached). Every command these tests run
    prints something, so an empty answer is that race: ask again, and never take
    a status of None for a failure.
    """
    for _ in range(5):
        found = container.client.api.exec_create(container.id, argv, **options)
        out = container.client.api.exec_start(found["Id"])
        for _ in range(100):
            code = container.client.api.exec_inspect(found["Id"])["ExitCode"]
            if code is not None:
                break
            time.sleep(0.05)
        if out and code is not None:
            return code, out.decode(errors="replace")
    raise AssertionError(f"{argv}: no output and status after 5 tries (status {code})")


@pytest.fixture(scope="module")
def docker_client() -> Any:
    import docker

    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine: {exc} (docker/start-dockerd.sh)")
    missing = [i for i in IMAGES if not client.images.list(name=i)]
    if missing:
        pytest.fail(f"images missing: {missing} (docker/build-images.sh --local-base)")
    return client


def deploy_dir(root: Path, tiny_model: Path, engine: str = "") -> Path:
    """A Bastion folder for compose: config, secrets, a signed copy of the tiny model;
    `engine`: more lines for its `[deployments.engine]`."""
    base = root / "deploy"
    bastion("init", "--dir", str(base), "--compose")
    model = base / "models" / "tiny"
    shutil.copytree(tiny_model, model)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)  # the engine's user reads it
    created = bastion("signing-key", "create", "--out", str(base / "keys" / "publisher.key"), "--json")
    key_id = json.loads(created.stdout)["key_id"]
    bastion("manifest", "create", str(model), "--out", str(base / "tiny.manifest.json"), "--name", "tiny")
    bastion("manifest", "sign", str(base / "tiny.manifest.json"), "--key", str(base / "keys" / "publisher.key"))
    with open(base / "bastion.toml", "a") as f:
        f.write(f"""
[[publishers]]
key_id = "{key_id}"
public_key = "keys/publisher.key.pub"

[[deployments]]
name = "tiny"
engine_url = "unix:/run/bastion-engine/engine.sock"
model_dir = "models/tiny"
manifest = "tiny.manifest.json"

[deployments.engine]
dtype = "bfloat16"
max_model_len = 512
cpu_kv_cache_gib = 1
{engine}""")
    return base


@dataclass
class Stack:
    project: str
    base: Path
    port: int
    env: dict[str, str]

    @property
    def config(self) -> str:
        return str(self.base / "bastion.toml")

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        files = [
            "-f",
            "docker/compose.yaml",
            "-f",
            "docker/compose.cpu.yaml",
            "-f",
            str(self.base / "compose.deploy.yaml"),
        ]
        return subprocess.run(
            ["docker-compose", "-p", self.project, *files, *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, check=check, timeout=timeout,
        )  # fmt: skip

    def gateway_cli(self, *args: str) -> str:
        return self.compose("exec", "-T", "gateway", "bastion", *args, "--config", self.config).stdout

    def key(self, role: str = "user") -> str:
        return json.loads(self.gateway_cli("keys", "create", "--name", f"t-{role}", "--role", role, "--json"))["key"]

    def container(self, client: Any, service: str) -> Any:
        found = client.containers.list(
            all=True, filters={"label": [f"com.docker.compose.project={self.project}",
                                         f"com.docker.compose.service={service}"]},
        )  # fmt: skip
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def psql(self, client: Any, sql: str) -> str:
        password = (self.base / "state" / "secrets" / "postgres-password").read_text().strip()
        pg = self.container(client, "postgres")
        cmd = ["psql", "-h", "127.0.0.1", "-U", "bastion", "-d", "bastion", "-tAc", sql]
        code, out = run_in(pg, cmd, environment={"PGPASSWORD": password}, user="postgres")
        assert code == 0, out
        return out.strip()


@pytest.fixture(scope="module")
def stack(docker_client: Any, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = deploy_dir(tmp_path_factory.mktemp("compose"), tiny_model)
    bastion("compose", "prepare", "--config", str(base / "bastion.toml"), "--cpu")
    port = free_port()
    env = {**os.environ, "BASTION_PUBLISH": f"127.0.0.1:{port}", "BASTION_POSTGRES_IMAGE": "bastion-postgres:latest"}
    s = Stack(f"bastiontest{secrets.token_hex(3)}", base, port, env)
    try:
        up = s.compose("up", "-d", check=False)
        if up.returncode != 0:
            pytest.fail(up.stdout + up.stderr + s.compose("logs", "--tail", "60", check=False).stdout)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gateway not ready:\n" + s.compose("logs", "--tail", "40", check=False).stdout)
            time.sleep(1)
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", check=False)


def test_compose_file_states_the_sandbox_of_the_sdk_runner(stack: Stack) -> None:
    """docker/compose.yaml and engine/container.py hold one sandbox: the merged config says the same."""
    import yaml

    merged = yaml.safe_load(stack.compose("config").stdout)
    engine = merged["services"]["engine"]
    assert set(merged["networks"]) == {"public", "db"}
    assert merged["networks"]["db"]["internal"] is True
    assert merged["networks"]["db"]["driver_opts"] == {"com.docker.network.bridge.inhibit_ipv4": "true"}
    assert engine["network_mode"] == SANDBOX.network_mode == "none"
    assert "networks" not in engine
    assert [t.replace("$$", "$") for t in engine["healthcheck"]["test"]] == healthcheck()["test"]
    assert LOOPBACK_ONLY.items() <= engine["environment"].items()
    assert mount_targets(engine) == {SOCKET_DIR: False, str((stack.base / "models" / "tiny").resolve()): True}
    assert mount_targets(merged["services"]["gateway"])[SOCKET_DIR] is True
    options = dict(o.partition("=")[::2] for o in merged["volumes"]["engine-socket"]["driver_opts"]["o"].split(","))
    assert (options["uid"], options["gid"], options["mode"]) == (str(ENGINE_UID), str(GATEWAY_UID), "2750")
    assert engine["read_only"] is True
    assert engine["cap_drop"] == list(SANDBOX.cap_drop)
    assert engine["security_opt"] == list(SANDBOX.security_opt)
    assert engine["user"] == SANDBOX.user
    assert engine["pids_limit"] == SANDBOX.pids_limit
    assert engine["tmpfs"] == [f"{k}:{v}" for k, v in SANDBOX.tmpfs.items()]
    assert "ports" not in engine
    gpu_engine = yaml.safe_load(
        subprocess.run(
            ["docker-compose", "-f", "docker/compose.yaml", "config"], cwd=ROOT, env=stack.env,
            capture_output=True, text=True, check=True,
        ).stdout
    )["services"]["engine"]  # fmt: skip
    assert gpu_engine["shm_size"] in ("16gb", SANDBOX.shm_size_gpu + "b", 17179869184)


def mount_targets(service: dict[str, Any]) -> dict[str, bool]:
    """A merged compose service's mounts, target -> read-only (docker-compose 1.29 prints short syntax, v2 long)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            _, target, *mode = volume.split(":")
            found[target] = mode == ["ro"]
        else:
            found[volume["target"]] = bool(volume.get("read_only"))
    return found


def test_call_through_the_published_port_is_audited_in_postgres(stack: Stack, docker_client: Any) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.port}/v1", api_key=stack.key(), timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
    )
    chat = raw.parse()
    assert chat.usage.completion_tokens > 0
    request_id = raw.headers["x-request-id"]
    row = stack.psql(
        docker_client,
        f"select phase, http_status, prompt_tokens, completion_tokens from audit_records "
        f"where request_id = '{request_id}' order by seq",
    )
    assert row.splitlines() == [
        "intent|||",
        f"final|200|{chat.usage.prompt_tokens}|{chat.usage.completion_tokens}",
    ]


def test_engine_container_is_sandboxed(stack: Stack, docker_client: Any) -> None:
    engine = stack.container(docker_client, "engine")
    host = engine.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert engine.attrs["Config"]["User"] == f"{ENGINE_UID}:{ENGINE_UID}"
    assert host["PidsLimit"] == SANDBOX.pids_limit
    assert not host["PortBindings"] and not engine.attrs["NetworkSettings"]["Ports"]
    assert host["NetworkMode"] == "none"
    assert set(engine.attrs["NetworkSettings"]["Networks"]) == {"none"}
    model = str(stack.base / "models" / "tiny")
    mounts = {m["Destination"]: m for m in engine.attrs["Mounts"]}
    assert mounts[model]["RW"] is False
    assert mounts["/run/secrets/engine_key"]["RW"] is False
    assert mounts[SOCKET_DIR]["RW"] is True
    command = engine.attrs["Config"]["Cmd"]
    assert command[command.index("--uds") + 1] == SOCKET_PATH
    assert command[command.index("--tensor-parallel-size") + 1] == "1"
    assert command[command.index("--max-model-len") + 1] == "512"
    # The key is in a file, not in argv nor in the configured environment.
    key = (stack.base / "state" / "secrets" / "engine-tiny.key").read_text().strip()
    assert key not in json.dumps(engine.attrs)
    # The process runs as the engine user, and cannot write outside the tmpfs.
    code, out = run_in(engine, ["sh", "-c", "id -u; touch /opt/x 2>&1; touch /tmp/ok && echo tmp-writable"])
    lines = out.splitlines()
    assert lines[0] == str(ENGINE_UID)
    assert "Read-only file system" in lines[1]
    assert lines[-1] == "tmp-writable"

    gateway = stack.container(docker_client, "gateway")
    assert gateway.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert gateway.attrs["Config"]["User"] == f"{GATEWAY_UID}:{GATEWAY_UID}"
    assert gateway.attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert {m["Destination"]: m for m in gateway.attrs["Mounts"]}[SOCKET_DIR]["RW"] is False
    # The socket and its folder: the engine's, open to the gateway's group, closed to others.
    code, out = run_in(gateway, ["stat", "-c", "%u %g %a", SOCKET_DIR, SOCKET_PATH])
    assert code == 0, out
    mode = f"{SOCKET_DIR_MODE:o}"
    assert out.split("\n")[:2] == [f"{ENGINE_UID} {GATEWAY_UID} {mode}", f"{ENGINE_UID} {GATEWAY_UID} 770"]


class HostListener:
    """A listener on every address of this host, counting who connects."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))  # noqa: S104 - the test shows the engine cannot reach it
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.accepted = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def connect_probe(address: str, port: int) -> str:
    return f"import socket; socket.create_connection(('{address}', {port}), timeout=3); print('connected')"


def socket_probe(path: str) -> str:
    return f"import socket; socket.socket(socket.AF_UNIX).connect('{path}'); print('connected')"


def test_engine_reaches_nothing_not_even_the_gateway(stack: Stack, docker_client: Any) -> None:
    """The engine has the loopback alone; listeners it must not reach: on another network, on the host, the gateway."""
    engine = stack.container(docker_client, "engine")
    python = "/opt/engine/bin/python"
    code, out = run_in(engine, ["cat", "/proc/net/dev"])
    assert code == 0, out
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
    assert interfaces == ["lo"]

    net = docker_client.networks.create(f"{stack.project}-outside", driver="bridge")
    listener = docker_client.containers.run(
        "bastion-base:bookworm", ["python3", "-m", "http.server", "9999"], network=net.name, detach=True,
        labels={"com.docker.compose.project": stack.project},
    )  # fmt: skip
    host = HostListener()
    try:
        listener.reload()
        address = listener.attrs["NetworkSettings"]["Networks"][net.name]["IPAddress"]
        control = docker_client.containers.run(
            "bastion-base:bookworm", ["python3", "-c", f"import time; time.sleep(1); {connect_probe(address, 9999)}"],
            network=net.name, remove=True,
        )  # fmt: skip
        assert b"connected" in control, "the listener must be reachable from its own network"
        gateway = stack.container(docker_client, "gateway")
        gateway_address = gateway.attrs["NetworkSettings"]["Networks"][f"{stack.project}_public"]["IPAddress"]
        public_gateway = docker_client.networks.get(f"{stack.project}_public").attrs["IPAM"]["Config"][0]["Gateway"]
        for target, port in ((address, 9999), (public_gateway, host.port), (gateway_address, 8000)):
            code, out = run_in(engine, [python, "-c", connect_probe(target, port)])
            assert code != 0 and "connected" not in out, f"{target}:{port}: {out}"
        assert host.accepted == 0
    finally:
        host.close()
        listener.remove(force=True)
        net.remove()

    # The one way in: the socket, for the gateway's group only.
    code, out = run_in(gateway, ["python3", "-c", socket_probe(SOCKET_PATH)])
    assert code == 0 and "connected" in out, out
    volume = {f"{stack.project}_engine-socket": {"bind": SOCKET_DIR, "mode": "ro"}}
    for user, expect in ((f"{GATEWAY_UID}:{GATEWAY_UID}", "connected"), ("10003:10003", "Permission denied")):
        out = docker_client.containers.run(
            "bastion-base:bookworm", ["sh", "-c", f'python3 -c "{socket_probe(SOCKET_PATH)}" 2>&1 || true'],
            user=user, volumes=volume, network_mode="none", remove=True,
        )  # fmt: skip
        assert expect in out.decode(), f"{user}: {out.decode()}"


def test_tampered_model_is_refused_inside_the_stack(stack: Stack) -> None:
    key, admin = stack.key(), stack.key("admin")
    url = f"http://127.0.0.1:{stack.port}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth).status_code == 200
    with open(stack.base / "models" / "tiny" / "config.json", "a") as f:
        f.write(" ")
    verify = httpx.post(f"{url}/admin/models/verify", headers={"authorization": f"Bearer {admin}"}, timeout=60)
    assert verify.status_code == 200, verify.text
    refused = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_unavailable"


def test_zz_compose_down_leaves_nothing(stack: Stack, docker_client: Any) -> None:
    down = stack.compose("down", "-v", "--remove-orphans")
    assert down.returncode == 0
    label = {"label": f"com.docker.compose.project={stack.project}"}
    assert docker_client.containers.list(all=True, filters=label) == []
    assert docker_client.networks.list(filters=label) == []
    assert docker_client.volumes.list(filters=label) == []


def test_bastion_engine_up_status_down(docker_client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """The same sandbox through the Docker SDK: up (after verifying the model), status, a call, down.
    With two tensor-parallel workers (each on a core of its own), which meet on the loopback alone."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    base = deploy_dir(tmp_path, tiny_model, f'tensor_parallel_size = 2\ncpu_threads_bind = "{first}|{second}"\n')
    config = str(base / "bastion.toml")
    up = bastion("engine", "up", "--config", config, "--cpu", "--wait", "600", "--json", check=False, timeout=700)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(up.stdout)
        assert status["health"] == "healthy"
        engine = docker_client.containers.get(status["container"])
        host = engine.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert engine.attrs["Config"]["User"] == f"{ENGINE_UID}:{ENGINE_UID}"
        assert not engine.attrs["NetworkSettings"]["Ports"]
        assert engine.attrs["HostConfig"]["NetworkMode"] == "none"
        # Both workers are up, and what they say to each other goes over 127.0.0.1.
        logs = engine.logs().decode(errors="replace")
        assert "world_size=2 rank=0" in logs and "world_size=2 rank=1" in logs
        code, out = run_in(engine, ["cat", "/proc/net/tcp"])
        assert code == 0, out
        tcp = out.splitlines()[1:]
        ends = {end.split(":")[0] for line in tcp for end in line.split()[1:3]}
        assert tcp and ends <= {"0100007F", "00000000"}, tcp  # 127.0.0.1, or a listener's unbound remote
        socket_dir = Path("/run/bastion/engine-tiny")
        assert status["engine_url"] == f"unix:{socket_dir}/engine.sock"
        info = socket_dir.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (ENGINE_UID, GATEWAY_UID, SOCKET_DIR_MODE)
        # Only the engine's own key opens it, through its socket, as the gateway's user in a container of its own.
        key = (base / "state" / "secrets" / "engine-tiny.key").read_text().strip()
        ask = (
            "import sys, socket, http.client\n"
            "for auth in ({}, {'authorization': 'Bearer ' + sys.argv[1]}):\n"
            "    c = http.client.HTTPConnection('engine', timeout=10)\n"
            f"    c.sock = socket.socket(socket.AF_UNIX); c.sock.connect('{socket_dir}/engine.sock')\n"
            "    c.request('GET', '/v1/models', headers=auth); r = c.getresponse()\n"
            "    print(r.read().decode() if r.status == 200 else r.status)\n"
        )
        out = (
            docker_client.containers.run(
                "bastion-base:bookworm",
                ["python3", "-c", ask, key],
                user=f"{GATEWAY_UID}:{GATEWAY_UID}",
                volumes={str(socket_dir): {"bind": str(socket_dir), "mode": "ro"}},
                network_mode="none",
                remove=True,
            )  # fmt: skip
            .decode()
            .splitlines()
        )
        assert out[0] == "401"
        assert [m["id"] for m in json.loads(out[1])["data"]] == ["tiny"]
        assert bastion("engine", "status", "--config", config).returncode == 0
        # vLLM leaves its socket behind when it stops, and would fail to bind
        # it again: the entrypoint clears it, and the engine comes back.
        engine.stop(timeout=20)
        assert stat.S_ISSOCK((socket_dir / "engine.sock").lstat().st_mode)
        engine.start()
        deadline = time.monotonic() + 600
        while bastion("engine", "status", "--config", config, check=False).returncode != 0:
            engine.reload()
            assert engine.status == "running" and time.monotonic() < deadline, engine.logs(tail=30).decode()
            time.sleep(2)
    finally:
        down = bastion("engine", "down", "--config", config, check=False)
    assert "removed" in down.stdout
    assert bastion("engine", "status", "--config", config, check=False).returncode == 1
    assert not Path("/run/bastion/engine-tiny").exists()


def test_engine_up_refuses_a_tampered_model(docker_client: Any, tiny_model: Path, tmp_path: Path) -> None:
    base = deploy_dir(tmp_path, tiny_model)
    (base / "models" / "tiny" / "extra.bin").write_bytes(b"x")
    up = bastion("engine", "up", "--config", str(base / "bastion.toml"), "--cpu", check=False)
    assert up.returncode == 1
    assert "FAILED verification" in up.stderr
    assert docker_client.containers.list(all=True, filters={"name": "bastion-engine-tiny"}) == []


def test_gpu_deploy_file_merges_with_docker_compose(tmp_path: Path) -> None:
    """A GPU render (tensor parallel 2) is a valid compose file for docker-compose 1.29, with 2 GPUs reserved."""
    import yaml

    from tests.test_compose import compose_dir

    base = compose_dir(tmp_path)
    bastion("compose", "prepare", "--config", str(base / "bastion.toml"))
    merged = subprocess.run(
        ["docker-compose", "-f", "docker/compose.yaml", "-f", str(base / "compose.deploy.yaml"), "config"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    engine = yaml.safe_load(merged.stdout)["services"]["engine"]
    (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == 2 and device["capabilities"] == ["gpu"]
    assert engine["image"] == "bastion-engine-gpu:latest"
    assert engine["command"][engine["command"].index("--tensor-parallel-size") + 1] == "2"

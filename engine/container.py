"""Run vLLM in a sandboxed container through the Docker SDK.

The sandbox is what a compromised engine must be held to: no network at all,
and one way in, a Unix socket that only the gateway's group may open. It is
written down once, here, as data (`SANDBOX`), and `docker/compose.yaml` states
the same settings for compose users; a test compares the two so they cannot
drift apart.

- read-only root filesystem; tmpfs only at /tmp (noexec) and at the compile
  caches' folder (which must allow exec: vLLM loads the kernels it compiles);
- every capability dropped, `no-new-privileges`, a non-root user, a pids limit;
- the model folder mounted read-only, at the same path as on the host (so the
  manifest the gateway verified names the files the engine reads);
- no network: Docker's `none` mode leaves the container its loopback and
  nothing else, so it reaches no other container, not the host's services, not
  the gateway's ports; vLLM listens on a Unix socket in a folder mounted from
  outside (compose: a tmpfs volume the gateway mounts read-only; `bastion engine
  up`: a host folder under /run/bastion). The folder is the engine user's,
  setgid to the gateway's group and closed to others, and the entrypoint's
  umask 007 gives that group the write permission `connect()` needs;
- tensor-parallel workers rendezvous on the loopback (`LOOPBACK_ONLY`);
- the API key as a file mounted read-only, read by the entrypoint
  (`docker/engine-entrypoint.sh`), never in argv or the container's environment;
- GPUs: exactly `tensor_parallel_size` of them, and shared memory for NCCL.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.spec import EngineSpec

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

# Fixed ids, so that secret files on the host can be given to exactly one container user.
GATEWAY_UID = 10001
ENGINE_UID = 10002
POSTGRES_UID = 999  # the official postgres image's (docker/postgres.Dockerfile matches it)

# Inside the container, the engine's only listener; the folder is a mount shared with the gateway.
SOCKET_DIR = "/run/bastion-engine"
SOCKET_PATH = f"{SOCKET_DIR}/engine.sock"
# Owner ENGINE_UID, group GATEWAY_UID: rwx for the engine, r-x for the gateway,
# setgid so the socket vLLM creates there takes the gateway's group.
SOCKET_DIR_MODE = 0o2750
# `bastion engine up` keeps each engine's socket folder here, on the host.
HOST_SOCKET_ROOT = Path("/run/bastion")
CACHE_DIR = "/var/cache/bastion-engine"  # compile caches (docker/engine-entrypoint.sh points vLLM here)
KEY_PATH = "/run/secrets/engine_key"
LABEL = "org.bastion.engine"  # on every container this runner creates

# With no interface but `lo`, say so to vLLM, NCCL and Gloo rather than let them guess.
LOOPBACK_ONLY = {"VLLM_HOST_IP": "127.0.0.1", "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}

CPU_IMAGE = "bastion-engine-cpu:latest"
GPU_IMAGE = "bastion-engine-gpu:latest"


@dataclass(frozen=True)
class Sandbox:
    """The engine container's confinement (compose: docker/compose.yaml's `engine`)."""

    user: str = f"{ENGINE_UID}:{ENGINE_UID}"
    network_mode: str = "none"
    read_only: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    security_opt: tuple[str, ...] = ("no-new-privileges:true",)
    pids_limit: int = 4096
    # /tmp is noexec. vLLM compiles its model graph (torch inductor, Triton) into
    # shared objects that it then loads, so its caches need a mount that allows
    # exec: a tmpfs of their own, gone with the container.
    tmpfs: dict[str, str] = field(
        default_factory=lambda: {"/tmp": "size=1g,mode=1777", CACHE_DIR: "size=8g,mode=1777,exec"}  # noqa: S108
    )
    shm_size_gpu: str = "16g"
    shm_size_cpu: str = "1g"


SANDBOX = Sandbox()


class ContainerEngineError(Exception):
    """Docker refused, or the engine container exited or never became healthy."""


@dataclass(frozen=True)
class ContainerEngineConfig:
    name: str  # the deployment; the model name vLLM serves
    image: str
    model_dir: Path  # host path, mounted read-only at the same path
    key_file: Path  # host file with the engine key, readable by ENGINE_UID
    socket_dir: Path  # host folder mounted at SOCKET_DIR, where the engine's socket appears
    spec: EngineSpec
    gpus: bool  # ask Docker for spec.tensor_parallel_size GPUs

    @property
    def container_name(self) -> str:
        return f"bastion-engine-{self.name}"

    @property
    def host_socket(self) -> Path:
        """The engine's socket as the host sees it."""
        return self.socket_dir / Path(SOCKET_PATH).name

    @property
    def engine_url(self) -> str:
        """What the gateway's `engine_url` is for this engine."""
        return f"unix:{self.host_socket}"


def engine_command(spec: EngineSpec, name: str, model_dir: Path) -> list[str]:
    """vLLM's arguments inside a container: the same spec as every other runner."""
    return spec.vllm_args(model_dir=str(model_dir), served_name=name, listen=["--uds", SOCKET_PATH])


def engine_environment(spec: EngineSpec) -> dict[str, str]:
    return {**spec.environment(), **LOOPBACK_ONLY, "BASTION_ENGINE_KEY_FILE": KEY_PATH}


# vLLM's /health over the socket, with the image's Python (no curl in the images).
HEALTH_PROBE = (
    "import socket, http.client as h; c = h.HTTPConnection('engine', timeout=3); "
    f"c.sock = socket.socket(socket.AF_UNIX); c.sock.settimeout(3); c.sock.connect('{SOCKET_PATH}'); "
    "c.request('GET', '/health'); raise SystemExit(c.getresponse().status != 200)"
)


def healthcheck() -> dict[str, Any]:
    """Docker health check: vLLM's /health from inside the container."""
    return {
        "test": ["CMD-SHELL", f'exec "$BASTION_ENGINE_PYTHON" -c "{HEALTH_PROBE}"'],
        "interval": 5_000_000_000,
        "timeout": 5_000_000_000,
        "retries": 3,
        "start_period": 900_000_000_000,
    }


def run_kwargs(config: ContainerEngineConfig) -> dict[str, Any]:
    """Everything `docker.containers.run` needs for a sandboxed engine."""
    from docker.types import DeviceRequest, Mount

    s = SANDBOX
    mounts = [
        Mount(str(config.model_dir), str(config.model_dir), type="bind", read_only=True),
        Mount(KEY_PATH, str(config.key_file), type="bind", read_only=True),
        Mount(SOCKET_DIR, str(config.socket_dir), type="bind"),
    ]
    kwargs: dict[str, Any] = {
        "name": config.container_name,
        "command": engine_command(config.spec, config.name, config.model_dir),
        "environment": engine_environment(config.spec),
        "user": s.user,
        "read_only": s.read_only,
        "cap_drop": list(s.cap_drop),
        "security_opt": list(s.security_opt),
        "pids_limit": s.pids_limit,
        "tmpfs": dict(s.tmpfs),
        "shm_size": s.shm_size_gpu if config.gpus else s.shm_size_cpu,
        "mounts": mounts,
        "network_mode": s.network_mode,
        "healthcheck": healthcheck(),
        "labels": {LABEL: config.name},
        "detach": True,
    }
    if config.gpus:
        count = config.spec.tensor_parallel_size
        kwargs["device_requests"] = [DeviceRequest(driver="nvidia", count=count, capabilities=[["gpu"]])]
    return kwargs


@dataclass(frozen=True)
class EngineStatus:
    name: str
    container: str
    state: str  # running, exited, ..., or "absent"
    health: str  # starting, healthy, unhealthy, or "" when absent
    engine_url: str  # the gateway's engine_url for it: its socket on the host
    image: str


class ContainerEngine:
    """One deployment's engine container: up (socket folder and container), status, down."""

    def __init__(self, client: docker.DockerClient, config: ContainerEngineConfig):
        self.client = client
        self.config = config

    def _container(self) -> Container | None:
        from docker.errors import NotFound

        try:
            return self.client.containers.get(self.config.container_name)
        except NotFound:
            return None

    def _socket_dir(self) -> None:
        """The host folder the socket appears in: the engine's to write, the gateway's group's to open."""
        folder = self.config.socket_dir
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise ContainerEngineError(f"{folder} (the engine's socket folder) is not a folder")
        try:
            os.chown(folder, ENGINE_UID, GATEWAY_UID)
        except PermissionError:
            raise ContainerEngineError(f"cannot give {folder} to the engine's user {ENGINE_UID}: run as root") from None
        folder.chmod(SOCKET_DIR_MODE)

    def up(self) -> EngineStatus:
        from docker.errors import APIError, ImageNotFound

        if self._container() is not None:
            raise ContainerEngineError(f"{self.config.container_name} exists; `bastion engine down` first")
        for path, what in ((self.config.model_dir, "model folder"), (self.config.key_file, "engine key")):
            if not path.exists():
                raise ContainerEngineError(f"the {what} {path} does not exist")
        self._socket_dir()
        try:
            self.client.containers.run(self.config.image, **run_kwargs(self.config))
        except ImageNotFound:
            raise ContainerEngineError(f"image {self.config.image} not found (docker/build-images.sh)") from None
        except APIError as exc:
            raise ContainerEngineError(f"docker refused the engine container: {exc.explanation or exc}") from None
        return self.status()

    def wait_healthy(self, timeout: float, poll: float = 2.0) -> EngineStatus:
        import time

        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status.health == "healthy":
                return status
            if status.state not in ("created", "running"):
                raise ContainerEngineError(f"{status.container} is {status.state}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise ContainerEngineError(f"{status.container} not healthy after {timeout:.0f}s:\n{self.logs()}")
            time.sleep(poll)

    def status(self) -> EngineStatus:
        c = self._container()
        if c is None:
            return EngineStatus(self.config.name, self.config.container_name, "absent", "", "", self.config.image)
        c.reload()
        state = c.attrs["State"]
        image = c.attrs["Config"]["Image"]
        health = state.get("Health", {}).get("Status", "")
        return EngineStatus(self.config.name, c.name, state["Status"], health, self.config.engine_url, image)

    def logs(self, lines: int = 25) -> str:
        c = self._container()
        return c.logs(tail=lines).decode(errors="replace") if c is not None else ""

    def down(self, grace: int = 20) -> bool:
        """Stop and remove the container, then its socket folder; False when there was no container."""
        c = self._container()
        if c is not None:
            c.stop(timeout=grace)
            c.remove()
        self.config.host_socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # gone already, or holds more than the socket: left to look at
            self.config.socket_dir.rmdir()
        return c is not None

"""Run vLLM in a sandboxed container through the Docker SDK.

The sandbox is what a compromised engine must be held to: no way out but the
gateway. It is written down once, here, as data (`SANDBOX`), and
`docker/compose.yaml` states the same settings for compose users; a test
compares the two so they cannot drift apart.

- read-only root filesystem; tmpfs only at /tmp (noexec) and at the compile
  caches' folder (which must allow exec: vLLM loads the kernels it compiles);
- every capability dropped, `no-new-privileges`, a non-root user, a pids limit;
- the model folder mounted read-only, at the same path as on the host (so the
  manifest the gateway verified names the files the engine reads);
- one `internal` network (no route off the host) on which the host itself has
  no address (`inhibit_ipv4`: else the host's own services on 0.0.0.0 would be
  one hop away), no published port;
- the API key as a file mounted read-only, read by the entrypoint
  (`docker/engine-entrypoint.sh`), never in argv or the container's environment;
- GPUs: exactly `tensor_parallel_size` of them, and shared memory for NCCL.
"""

from __future__ import annotations

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

ENGINE_PORT = 8000  # inside the container; never published
CACHE_DIR = "/var/cache/bastion-engine"  # compile caches (docker/engine-entrypoint.sh points vLLM here)
KEY_PATH = "/run/secrets/engine_key"
LABEL = "org.bastion.engine"  # on every container and network this runner creates

# The host takes no address on the engine's bridge (docker/compose.yaml says the same).
NETWORK_OPTIONS = {"com.docker.network.bridge.inhibit_ipv4": "true"}

CPU_IMAGE = "bastion-engine-cpu:latest"
GPU_IMAGE = "bastion-engine-gpu:latest"


@dataclass(frozen=True)
class Sandbox:
    """The engine container's confinement (compose: docker/compose.yaml's `engine`)."""

    user: str = f"{ENGINE_UID}:{ENGINE_UID}"
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
    spec: EngineSpec
    gpus: bool  # ask Docker for spec.tensor_parallel_size GPUs

    @property
    def container_name(self) -> str:
        return f"bastion-engine-{self.name}"

    @property
    def network_name(self) -> str:
        return f"bastion-engine-{self.name}"


def engine_command(spec: EngineSpec, name: str, model_dir: Path) -> list[str]:
    """vLLM's arguments inside a container: the same spec as every other runner."""
    listen = ["--host", "0.0.0.0", "--port", str(ENGINE_PORT)]  # noqa: S104
    return spec.vllm_args(model_dir=str(model_dir), served_name=name, listen=listen)


def engine_environment(spec: EngineSpec) -> dict[str, str]:
    return {**spec.environment(), "BASTION_ENGINE_KEY_FILE": KEY_PATH}


def healthcheck() -> dict[str, Any]:
    """Docker health check: vLLM's /health from inside the container (the image's Python)."""
    probe = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{ENGINE_PORT}/health', timeout=3)"
    return {
        "test": ["CMD-SHELL", f'exec "$BASTION_ENGINE_PYTHON" -c "{probe}"'],
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
        "network": config.network_name,
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
    address: str  # on its internal network, reachable from containers on it ("" when absent)
    image: str


class ContainerEngine:
    """One deployment's engine container: up (create network and container), status, down."""

    def __init__(self, client: docker.DockerClient, config: ContainerEngineConfig):
        self.client = client
        self.config = config

    def _container(self) -> Container | None:
        from docker.errors import NotFound

        try:
            return self.client.containers.get(self.config.container_name)
        except NotFound:
            return None

    def _network(self) -> None:
        """The engine's own internal network (no route off the host), made once."""
        from docker.errors import NotFound

        try:
            net = self.client.networks.get(self.config.network_name)
        except NotFound:
            self.client.networks.create(
                self.config.network_name, driver="bridge", internal=True, options=NETWORK_OPTIONS,
                labels={LABEL: self.config.name},
            )  # fmt: skip
            return
        options = net.attrs.get("Options") or {}
        if not net.attrs.get("Internal") or any(options.get(k) != v for k, v in NETWORK_OPTIONS.items()):
            raise ContainerEngineError(f"network {self.config.network_name} exists but is not sandboxed; remove it")

    def up(self) -> EngineStatus:
        from docker.errors import APIError, ImageNotFound

        if self._container() is not None:
            raise ContainerEngineError(f"{self.config.container_name} exists; `bastion engine down` first")
        for path, what in ((self.config.model_dir, "model folder"), (self.config.key_file, "engine key")):
            if not path.exists():
                raise ContainerEngineError(f"the {what} {path} does not exist")
        self._network()
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
        nets = c.attrs["NetworkSettings"]["Networks"]
        address = (nets.get(self.config.network_name) or {}).get("IPAddress", "")
        image = c.attrs["Config"]["Image"]
        return EngineStatus(
            self.config.name, c.name, state["Status"], state.get("Health", {}).get("Status", ""), address, image
        )

    def logs(self, lines: int = 25) -> str:
        c = self._container()
        return c.logs(tail=lines).decode(errors="replace") if c is not None else ""

    def down(self, grace: int = 20) -> bool:
        """Stop and remove the container, then its network; False when there was none."""
        from docker.errors import NotFound

        c = self._container()
        if c is not None:
            c.stop(timeout=grace)
            c.remove()
        try:
            net = self.client.networks.get(self.config.network_name)
        except NotFound:
            return c is not None
        if net.attrs.get("Labels", {}).get(LABEL) == self.config.name:
            net.reload()
            if not net.attrs.get("Containers"):
                net.remove()
        return c is not None

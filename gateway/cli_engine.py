"""`bastion engine up|down|status` (the sandboxed engine through the Docker SDK) and `bastion compose prepare`.

Both take the engine settings from the deployment's engine spec in
bastion.toml, and the sandbox from `engine/container.py`, so a container
started here is the container compose starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from engine.container import (
    CPU_IMAGE,
    ENGINE_UID,
    GPU_IMAGE,
    HOST_SOCKET_ROOT,
    ContainerEngine,
    ContainerEngineConfig,
    ContainerEngineError,
    EngineStatus,
)
from engine.secret_files import hand_over
from gateway.clikit import (
    CheckFailed,
    OnceEachGroup,
    UsageProblem,
    config_option,
    echo_json,
    ensure_engine_key,
    err_console,
    settings_from,
    verify_before_start,
)
from gateway.settings import ConfigError, Deployment, Settings


def _deployment(settings: Settings, name: str | None) -> Deployment:
    if name is None:
        if len(settings.deployments) != 1:
            names = ", ".join(d.name for d in settings.deployments) or "none"
            raise UsageProblem(f"name the deployment with --deployment (the config has: {names})")
        return settings.deployments[0]
    deployment = settings.deployment(name)
    if deployment is None:
        raise UsageProblem(f"no deployment {name!r} in the config")
    return deployment


def _engine(
    settings: Settings, deployment: Deployment, gpus: bool = False, image: str | None = None
) -> ContainerEngine:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise UsageProblem(f"no Docker engine reachable: {exc}") from None
    config = ContainerEngineConfig(
        name=deployment.name,
        image=image or (GPU_IMAGE if gpus else CPU_IMAGE),
        model_dir=settings.path(deployment.model_dir).resolve(),
        key_file=settings.state_path.resolve() / "containers" / f"engine-{deployment.name}.key",
        socket_dir=HOST_SOCKET_ROOT / f"engine-{deployment.name}",
        spec=deployment.engine,
        gpus=gpus,
    )
    return ContainerEngine(client, config)


def _engine_key_copy(settings: Settings, deployment: Deployment, target: Path) -> None:
    """The engine's own copy of its key, readable by the engine's container user only."""
    from gateway.services import read_engine_key

    ensure_engine_key(settings, deployment.name)
    read_engine_key(settings, deployment.name)  # refuse an empty or unreadable key now, not in the container
    try:
        hand_over(settings.engine_key_path(deployment), target, ENGINE_UID)
    except PermissionError:
        raise UsageProblem(f"cannot give {target} to the engine's user {ENGINE_UID}: run as root") from None


def _print_status(status: EngineStatus, as_json: bool) -> None:
    if as_json:
        echo_json(asdict(status))
        return
    health = f", {status.health}" if status.health else ""
    where = f" at {status.engine_url}" if status.engine_url else ""
    click.echo(f"engine {status.name}: {status.state}{health}{where} ({status.container}, {status.image})")


F = TypeVar("F", bound=Callable[..., Any])


def deployment_option(fn: F) -> F:
    return click.option("--deployment", default=None, help="Which deployment (default: the only one).")(fn)


def image_options(fn: F) -> F:
    fn = click.option("--image", default=None, help=f"Engine image (default: {GPU_IMAGE} or {CPU_IMAGE}).")(fn)
    return click.option(
        "--gpus/--cpu", default=True, show_default=True,
        help="The GPU image with tensor_parallel_size GPUs, or the CPU image.",
    )(fn)  # fmt: skip


@click.group("engine", cls=OnceEachGroup)
def engine_group() -> None:
    """The sandboxed engine container, through the Docker SDK (for operators not using compose)."""


@engine_group.command("up")
@config_option
@deployment_option
@image_options
@click.option(
    "--wait", "wait_seconds", default=900, show_default=True, help="Seconds to wait for health; 0: do not wait."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def engine_up(
    config_path: Path, deployment: str | None, gpus: bool, image: str | None, wait_seconds: int, as_json: bool
) -> None:
    """Verify the model, then start its engine in the sandbox, with no network, on a Unix socket."""
    settings = settings_from(config_path)
    d = _deployment(settings, deployment)
    if not d.model_dir:
        raise UsageProblem(f"deployment {d.name!r} has no model_dir")
    verify_before_start(settings, [d])  # a model that fails verification: CheckFailed, no container
    engine = _engine(settings, d, gpus, image)
    _engine_key_copy(settings, d, engine.config.key_file)
    try:
        status = engine.up()
        err_console.print(f"engine {d.name}: started ({status.container})")
        if wait_seconds:
            status = engine.wait_healthy(wait_seconds)
    except ContainerEngineError as exc:
        raise CheckFailed(str(exc)) from None
    _print_status(status, as_json)


@engine_group.command("status")
@config_option
@deployment_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def engine_status(config_path: Path, deployment: str | None, as_json: bool) -> None:
    """State and health of the engine container; exit 1 unless it is running and healthy."""
    settings = settings_from(config_path)
    status = _engine(settings, _deployment(settings, deployment)).status()
    _print_status(status, as_json)
    if status.health != "healthy":
        raise SystemExit(1)


@engine_group.command("down")
@config_option
@deployment_option
def engine_down(config_path: Path, deployment: str | None) -> None:
    """Stop and remove the engine container and its socket folder."""
    settings = settings_from(config_path)
    engine = _engine(settings, _deployment(settings, deployment))
    removed = engine.down()
    click.echo(f"engine {engine.config.name}: {'removed' if removed else 'not running'}")


@click.group("compose", cls=OnceEachGroup)
def compose_group() -> None:
    """docker compose deployments (docker/compose.yaml)."""


@compose_group.command("prepare")
@config_option
@click.option("--deployment", default=None, help="Which deployment the engine service serves (default: the only one).")
@click.option("--gpus/--cpu", default=True, show_default=True, help="Ask for tensor_parallel_size GPUs, or none.")
def compose_prepare(config_path: Path, deployment: str | None, gpus: bool) -> None:
    """Render DIR/compose.deploy.yaml from the engine spec and hand each secret file to its container user."""
    from gateway.compose import prepare

    settings = settings_from(config_path)
    try:
        prepared = prepare(settings, _deployment(settings, deployment), gpus=gpus)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    cpu = " -f docker/compose.cpu.yaml" if not gpus else ""
    click.echo(f"wrote {prepared.deploy_file}")
    click.echo(f"start: docker-compose -p bastion -f docker/compose.yaml{cpu} -f {prepared.deploy_file} up -d")

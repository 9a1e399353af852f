"""What every `bastion` command shares: exit-code errors, `--config`, output helpers."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console

from gateway import logs
from gateway.settings import ConfigError, Settings, load_settings, resolve_config_path

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)


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


def echo_json(data: Any) -> None:
    click.echo(msgspec.json.encode(data).decode())

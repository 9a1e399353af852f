"""What every `bastion` command shares: exit-code errors, `--config`, output helpers."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console

from engine import manifest
from gateway import logs
from gateway.keys import ensure_token_file
from gateway.settings import ConfigError, Deployment, Settings, load_settings, resolve_config_path

F = TypeVar("F", bound=Callable[..., Any])
# Markup off: these print what callers, identity providers and database rows
# chose (model names, routes, teams, file names), and rich would read a "[/]"
# in one as a tag and stop the command, or restyle the evidence it shows.
# Colour is given as a style (`rich.text.Text`), never as markup.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)
# rich passes these through, and ESC starts terminal sequences (clear the
# screen, retitle the window, hide text, plant a link) an auditor would obey.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(value: object) -> str:
    """A value as terminal text: control characters become visible escapes (`\\x1b`)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


class CheckFailed(click.ClickException):
    """The thing checked failed: exit code 1."""

    exit_code = 1


class UsageProblem(click.ClickException):
    """Configuration or usage error: exit code 2."""

    exit_code = 2


class OnceEachCommand(click.Command):
    """A command that refuses an option given twice (exit 2).

    click keeps the last value of a repeated option, silently: `keys create
    --role user ... --role admin` made an admin key, and `audit export --team
    risk --team ops` answered for ops alone. An option meant to repeat says so
    (`multiple=True`, or a counter) and is left alone.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            # The parser only sorts the words into options (no callbacks, no
            # conversion), so reading them once more here changes nothing.
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            seen: set[str | None] = set()
            for param in order:
                if isinstance(param, click.Option) and not (param.multiple or param.count):
                    if param.name in seen:
                        names = "/".join(param.opts + param.secondary_opts)
                        raise click.UsageError(f"{names} is given more than once; give it at most once.", ctx)
                    seen.add(param.name)
        return super().parse_args(ctx, args)


class OnceEachGroup(click.Group):
    """A group whose commands and subgroups are `OnceEachCommand`s and `OnceEachGroup`s."""

    command_class = OnceEachCommand
    group_class = type


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


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over bytes hashed, on stderr; yields the callback for the hashing threads."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("{task.description}", *columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def ensure_engine_key(settings: Settings, name: str) -> None:
    deployment = settings.deployment(name)
    assert deployment is not None
    ensure_token_file(settings.engine_key_path(deployment))


def verify_before_start(
    settings: Settings, deployments: list[Deployment] | None = None
) -> dict[str, manifest.Verification]:
    """Verify every model an engine runner would serve; a model that fails gets no engine."""
    from gateway.integrity import trusted_keys, verify_deployment

    try:
        trusted = trusted_keys(settings)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    results: dict[str, manifest.Verification] = {}
    chosen = settings.deployments if deployments is None else deployments
    for d in chosen:
        if not d.verify:
            err_console.print(f"model {d.name}: verify = false, served without an integrity check")
            continue
        with byte_progress(f"verifying {d.name}", folder_bytes(settings.path(d.model_dir))) as progress:
            result = results[d.name] = verify_deployment(settings, d, trusted, progress)
        if result.ok:
            err_console.print(
                f"model {d.name}: verified ({result.bytes_hashed} bytes, {result.seconds:.1f}s, key {result.key_id})"
            )
        else:
            err_console.print(f"model {d.name}: FAILED verification")
            for problem in result.problems:
                err_console.print(f"  {shown(problem)}")
    if results and not any(r.ok for r in results.values()) and all(d.verify for d in chosen):
        raise CheckFailed("no model passed verification; nothing to serve")
    return results

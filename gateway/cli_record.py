"""The CLI's own audit trail: every operator command that reads the trail or
changes who may call (keys, prune, keyring) writes a `system` record naming the
OS user, on a stream of its own, signed and sealed like a gateway's. If the
record cannot be written, the command does not go ahead (or, where it already
happened, says so and exits 1).
"""

from __future__ import annotations

import getpass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.record import system_record
from gateway.clikit import CheckFailed
from gateway.db import run_with_engine
from gateway.errors import AuditUnavailable
from gateway.hotpath import hot_path_for
from gateway.services import open_writer
from gateway.settings import ConfigError, Settings


async def _record_action(
    settings: Settings, engine: AsyncEngine, action: str, detail: dict[str, Any], **outcome: Any
) -> None:
    """Write one system record `cli.<action>` on a stream of its own, then seal the stream."""
    url = settings.database_url()
    hot = hot_path_for(url, engine, busy_timeout_ms=settings.database.sqlite_busy_timeout_ms)
    writer = open_writer(settings, hot)
    await writer.start()
    try:
        await writer.write(
            system_record(
                f"cli.{action}",
                method="CLI",
                detail=detail,
                auth_method="os_user",
                key_name=getpass.getuser(),
                **({"outcome": "ok"} | outcome),
            )
        )
    finally:
        await writer.close()
        await hot.close()


def _record(settings: Settings, action: str, detail: dict[str, Any], **outcome: Any) -> None:
    run_with_engine(settings.database_url(), lambda engine: _record_action(settings, engine, action, detail, **outcome))


def record_action(settings: Settings, action: str, detail: dict[str, Any]) -> None:
    try:
        _record(settings, action, detail)
    except (AuditUnavailable, ConfigError) as exc:
        raise CheckFailed(f"this action could not be audited, so it was not done: {exc}") from None


def record_ending(settings: Settings, action: str, detail: dict[str, Any], error: str | None) -> None:
    """Record how a long action recorded by `record_action` ended (`cli.<action>.end`,
    outcome `ok` or `error` with `error`); CheckFailed when that cannot be recorded."""
    fields = {"outcome": "error", "error_message": error} if error else {}
    try:
        _record(settings, f"{action}.end", detail, **fields)
    except (AuditUnavailable, ConfigError) as exc:
        raise CheckFailed(f"how {action} ended could not be audited: {exc}") from None

"""`bastion audit ...`: verify, query, export, stats, prune, keyring.

These read the database directly (operators on the gateway's host). Like the
API, each command is itself audited before it shows anything
(gateway.cli_record), so `audit query` leaves the same trace as GET /admin/audit/events.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from engine.manifest import key_id_of, load_public_key, public_key_path
from engine.secret_files import replacing
from gateway.audit import query
from gateway.audit.anchor import AnchorFile
from gateway.audit.capture import rotate_keyring
from gateway.audit.prune import prune
from gateway.audit.signing_keys import Rotation, history_folder, rotate
from gateway.audit.verify import Report, verify_database
from gateway.cli_record import record_action, record_ending
from gateway.clikit import (
    CheckFailed,
    OnceEachGroup,
    UsageProblem,
    config_option,
    console,
    echo_json,
    err_console,
    settings_from,
    shown,
)
from gateway.db import run_with_engine
from gateway.services import load_signer
from gateway.settings import ConfigError, Settings
from gateway.trust import audit_verify_keys
from gateway.utc import parse_utc

F = TypeVar("F", bound=Callable[..., Any])


@click.group("audit", cls=OnceEachGroup)
def audit() -> None:
    """The tamper-evident audit trail."""


def filter_options(fn: F) -> F:
    options = [
        click.option("--key-id", default=None, help="Only this API key's records."),
        click.option("--team", default=None),
        click.option("--model", default=None),
        click.option("--outcome", type=click.Choice(["ok", "refused", "error", "client_closed"]), default=None),
        click.option("--status", type=int, default=None, help="HTTP status."),
        click.option("--phase", type=click.Choice(["intent", "final", "system"]), default=None),
        click.option("--request-id", default=None),
        click.option("--since", default=None, help="ISO 8601 time (inclusive)."),
        click.option("--until", default=None, help="ISO 8601 time (exclusive)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        names = ("key_id", "team", "model", "outcome", "status", "phase", "request_id", "since", "until")
        given = {n: kwargs.pop(n) for n in names}
        params = {n: v for n, v in given.items() if v is not None}
        try:
            kwargs["event_filter"] = query.parse_filter(params)
        except query.QueryError as exc:
            raise UsageProblem(str(exc)) from None
        return fn(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _with_engine(settings: Settings, fn: Callable[[Any], Any]) -> Any:
    try:
        return run_with_engine(settings.database_url(), fn)
    except query.QueryError as exc:
        raise UsageProblem(str(exc)) from None


@audit.command("verify")
@config_option
@click.option(
    "--trusted-key",
    "trusted_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Audit public key to trust (repeatable; default: audit.trusted_keys, else the signing key's .pub).",
)
@click.option(
    "--anchor", "anchor_path", default=None, type=click.Path(dir_okay=False), help="Anchor file to check against."
)
@click.option("--no-anchor", is_flag=True, help="Check without the anchor file (tail truncation may go unseen).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify_cmd(
    config_path: Path, trusted_files: tuple[str, ...], anchor_path: str | None, no_anchor: bool, as_json: bool
) -> None:
    """Verify every stream of the trail; exit 0 only when it is intact."""
    settings = settings_from(config_path)
    try:
        if trusted_files:
            keys = [load_public_key(Path(f)) for f in trusted_files]
            trusted = {key_id_of(k): k for k in keys}
        else:
            trusted = audit_verify_keys(settings)
    except (ConfigError, ValueError, OSError) as exc:
        raise UsageProblem(str(exc)) from None
    anchor = None if no_anchor else AnchorFile(Path(anchor_path) if anchor_path else settings.audit_anchor_file)
    report = verify_database(settings.database_url(), trusted, anchor)
    record_action(settings, "audit.verify", {"intact": report.intact, "records": report.records})
    if as_json:
        echo_json(report.public())
    else:
        _print_report(report)
    if not report.intact:
        sys.exit(1)


def _print_report(report: Report) -> None:
    table = Table("stream", "records", "seqs", "checkpoints", "closed", "unanchored", "first problem")
    for s in report.streams:
        p = s.first_problem
        seqs = f"{s.first_seq}..{s.last_seq}" if s.first_seq is not None else "-"
        problem = (
            Text.assemble((f"{p.kind} at {p.seq}", "red"), f": {shown(p.detail)}") if p else Text("intact", "green")
        )
        table.add_row(shown(s.stream_id), str(s.records), seqs, str(s.checkpoints), "yes" if s.closed else "no",
                      str(s.unanchored), problem)  # fmt: skip
    console.print(table)
    for p in report.trail_problems:
        console.print(Text.assemble((p.kind, "red"), f": {shown(p.detail)}"))
    if report.incomplete_calls:
        console.print(f"{len(report.incomplete_calls)} incomplete call(s) (intent without outcome; not tampering)")
    rate = f"{report.records / report.seconds:,.0f} records/s" if report.seconds else ""
    verdict = Text("intact", "green") if report.intact else Text("NOT intact", "red")
    console.print(Text.assemble(f"{report.records} records in {report.seconds:.2f}s ({rate}): ", verdict))


@audit.command("query")
@config_option
@filter_options
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--cursor", default=None, help="The next_cursor of the previous page.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def query_cmd(
    config_path: Path, event_filter: query.EventFilter, limit: int, cursor: str | None, as_json: bool
) -> None:
    """One page of records, newest first."""
    settings = settings_from(config_path)
    record_action(settings, "audit.query", {"filter": event_filter.public(), "limit": limit, "cursor": cursor})
    page = _with_engine(settings, lambda e: query.page(e, event_filter, limit=limit, cursor=cursor))
    if as_json:
        echo_json({"object": "list", "data": page.events, "next_cursor": page.next_cursor})
        return
    table = Table("started", "request id", "phase", "key", "team", "model", "route", "status", "outcome", "tokens")
    for e in page.events:
        tokens = f"{e['prompt_tokens']}/{e['completion_tokens']}" if e["prompt_tokens"] is not None else "-"
        cells = [e["started_at"], e["request_id"], e["phase"], e["key_id"], e["team"], e["model"], e["route"]]
        cells += [str(e["http_status"] or ""), e["outcome"], tokens]
        table.add_row(*(shown(c or "-") for c in cells))
    console.print(table)
    if page.next_cursor:
        err_console.print(f"more: --cursor {page.next_cursor}")


@audit.command("export")
@config_option
@filter_options
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False), default=None, help="File to write, 0600 if new (default: stdout)."
)
def export_cmd(config_path: Path, event_filter: query.EventFilter, fmt: str, out: str | None) -> None:
    """Every matching record, oldest first, as JSON lines or CSV."""
    settings = settings_from(config_path)
    record_action(settings, "audit.export", {"filter": event_filter.public(), "format": fmt, "out": out})
    written = 0  # records handed to the file or stdout

    async def copy(engine: Any, sink: IO[bytes]) -> None:
        nonlocal written
        async for chunk in query.encoded(query.export(engine, event_filter), fmt):  # type: ignore[arg-type]
            sink.write(chunk.data)
            written += chunk.records
        sink.flush()

    def ended(error: str | None = None) -> None:
        record_ending(settings, "audit.export", {"records": written, "out": out}, error)

    try:
        if out:
            # Written whole: an export that fails part way (the database, a full
            # disk) leaves no file that looks complete, and an earlier OUT as it
            # was; the file takes its name only once its end is on record. 0600:
            # it names keys, teams and client addresses.
            with replacing(Path(out), 0o600) as sink:
                _with_engine(settings, lambda engine: copy(engine, sink))
                ended()
        else:
            _with_engine(settings, lambda engine: copy(engine, sys.stdout.buffer))
            ended()
    except (OSError, SQLAlchemyError) as exc:
        reason = str(exc).splitlines()[0][:300]  # SQLAlchemy's own text runs on with the SQL
        lost = f"{out} was not written" if out else "what went to stdout is not the whole export"
        try:
            ended(reason)
        except CheckFailed as unrecorded:
            lost += f"; {unrecorded}"
        raise CheckFailed(f"the export failed after {written} records ({reason}); {lost}") from None
    err_console.print(f"{written} records exported")


@audit.command("stats")
@config_option
@filter_options
@click.option("--bucket", type=click.Choice(["minute", "hour", "day"]), default="hour", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_cmd(config_path: Path, event_filter: query.EventFilter, bucket: str, as_json: bool) -> None:
    """Calls and tokens per time bucket, model, team and outcome."""
    settings = settings_from(config_path)
    record_action(settings, "audit.stats", {"filter": event_filter.public(), "bucket": bucket})
    rows = _with_engine(settings, lambda e: query.stats(e, event_filter, bucket))  # type: ignore[arg-type]
    if as_json:
        echo_json({"object": "list", "bucket": bucket, "data": rows})
        return
    table = Table("bucket", "model", "team", "outcome", "calls", "prompt tokens", "completion tokens")
    for r in rows:
        cells = [r["bucket"], r["model"] or "-", r["team"] or "-", r["outcome"] or "-"]
        cells += [r["calls"], r["prompt_tokens"], r["completion_tokens"]]
        table.add_row(*map(shown, cells))
    console.print(table)


@audit.command("prune")
@config_option
@click.option("--before", required=True, help="Remove checkpointed segments signed before this ISO 8601 date or time.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune_cmd(config_path: Path, before: str, yes: bool, as_json: bool) -> None:
    """Delete old records in whole checkpointed segments; the rest stays verifiable."""
    settings = settings_from(config_path)
    try:
        cut = parse_utc(before)
    except ValueError:
        raise UsageProblem("--before takes an ISO 8601 date or time, e.g. 2026-01-01") from None
    except OverflowError:
        raise UsageProblem("--before must be a time from year 1 to 9999 in UTC") from None
    if not yes:
        click.confirm(f"Delete audit records in segments checkpointed before {cut.isoformat()}?", abort=True)
    try:
        signer = load_signer(settings)
    except ConfigError as exc:
        raise UsageProblem(str(exc)) from None
    record_action(settings, "audit.prune", {"before": cut.isoformat()})
    pruned = _with_engine(settings, lambda e: prune(e, signer, AnchorFile(settings.audit_anchor_file), cut))
    result = [{"stream_id": p.stream_id, "through_seq": p.through, "records": p.records} for p in pruned]
    if as_json:
        echo_json(result)
    else:
        for p in result:
            click.echo(f"stream {p['stream_id']}: removed {p['records']} records up to seq {p['through_seq']}")
        click.echo(f"{sum(p['records'] for p in result)} records removed")


@audit.group("keyring")
def keyring() -> None:
    """Keys for encrypted payload capture."""


@keyring.command("rotate")
@config_option
def keyring_rotate(config_path: Path) -> None:
    """Add a new key and make it the one new payloads are encrypted with (old ones stay readable)."""
    settings = settings_from(config_path)
    key_id = rotate_keyring(settings.audit_keyring_file)
    record_action(settings, "audit.keyring_rotate", {"key_id": key_id})
    click.echo(f"active payload key {key_id}; restart or reload the gateway to use it")


@audit.group("signing-key")
def signing_key() -> None:
    """The key that signs the trail's checkpoints."""


@signing_key.command("rotate")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the old and new key ids as JSON.")
def signing_key_rotate(config_path: Path, as_json: bool) -> None:
    """Replace the audit signing key; the old one's public key stays trusted for what it signed."""
    settings = settings_from(config_path)
    key = settings.audit_signing_key

    def record(r: Rotation) -> None:
        # Signed by the old key, before anything changes: a rotation not on record is not done.
        record_action(settings, "audit.signing_key_rotate", {"old_key_id": r.old_key_id, "new_key_id": r.new_key_id})

    try:
        rotation = rotate(key, record)
    except FileNotFoundError:
        raise UsageProblem(f"audit signing key {key} not found (run `bastion init`)") from None
    except ValueError as exc:
        raise CheckFailed(f"cannot load the audit signing key {key}: {exc}") from None
    untrusted = settings.audit.trusted_keys and all(
        k.key_id != rotation.new_key_id for k in settings.audit.trusted_keys
    )
    if as_json:
        echo_json(
            {"old_key_id": rotation.old_key_id, "new_key_id": rotation.new_key_id, "history": str(history_folder(key))}
        )
    else:
        click.echo(
            f"audit signing key {rotation.new_key_id} replaces {rotation.old_key_id} (kept in {history_folder(key)})"
        )
        click.echo("reload the gateway (SIGHUP) or restart it to sign with the new key")
    if untrusted:
        err_console.print(
            f"warning: audit.trusted_keys does not list {rotation.new_key_id}: add "
            f"{public_key_path(key)} there, or verify will call what it signs unknown_key"
        )

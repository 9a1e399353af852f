"""The auditor API under /admin/audit: read, export, count and verify the trail.

Only keys with the `auditor` role get in (a `user` or `admin` key gets 403 and
an audit row). Every action is itself audited, with what was asked (filters,
format, request id) in the record's `detail`, and that record is durable before
any data leaves: an auditor cannot read the trail without leaving a trace.
Decrypting captured payloads also needs the key's `can_decrypt` permission.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response

from gateway.audit import query
from gateway.audit.anchor import AnchorFile
from gateway.audit.capture import KeyringError, load_keyring, open_payload
from gateway.audit.record import AuditRecord
from gateway.audit.verify import verify_database
from gateway.audit.writer import write_quietly
from gateway.calls import Call, answer, as_gateway_error, authenticate, headers_for, refuse
from gateway.errors import AuditUnavailable, BadRequest, Forbidden, GatewayError, NotFound
from gateway.services import Services
from gateway.settings import ConfigError
from gateway.streaming import Stream
from gateway.trust import audit_verify_keys

AUDIT_ROLES = frozenset({"auditor"})
_LIMIT = re.compile(r"[0-9]{1,4}")  # ASCII digits: str.isdigit() also takes "²", which int() refuses
_verify_lock = asyncio.Lock()


def _params(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The query parameters, each given at most once.

    A parameter given twice (`team=risk&team=ops`) is refused: taking either
    value would answer a question the auditor did not ask (one team's records
    read as both teams'), and the record would say only what was answered.
    """
    params: dict[str, str] = {}
    for name, value in request.query_params.items():
        if name in params:
            raise query.QueryError(f"The parameter {name!r} is given more than once; give each at most once.")
        params[name] = value
    return params


async def events(request: Request[Any, Any, Any], svc: Services) -> Response[Any]:
    """GET /admin/audit/events: a page as JSON, or every match as JSON lines or CSV."""
    call = Call.begin(request, svc.proxies)
    try:
        await authenticate(svc, request, call, AUDIT_ROLES)
        params = _params(request)
        fmt = params.pop("format", "json")
        limit = params.pop("limit", "100")
        cursor = params.pop("cursor", None)
        f = query.parse_filter(params)
        if fmt == "json":
            if not _LIMIT.fullmatch(limit):
                raise query.QueryError("limit must be a number between 1 and 1000.")
            page = await query.page(svc.db, f, limit=int(limit), cursor=cursor)
            body = msgspec.json.encode({"object": "list", "data": page.events, "next_cursor": page.next_cursor})
            detail = {"action": "query", "filter": f.public(), "returned": len(page.events), "cursor": cursor}
            return await answer(svc, call, body, detail)
        if fmt not in ("jsonl", "csv"):
            raise query.QueryError("format must be json, jsonl or csv.")
        # The export is on record (its intent) before its first byte leaves;
        # its final record says how it ended and how many records it sent.
        call.detail.update({"action": "export", "format": fmt, "filter": f.public()})
        await svc.audit.write(call.record("intent"))
        chunks = query.encoded(query.export(svc.db, f), fmt)  # type: ignore[arg-type]
        # Read before the status line: a database that fails at once is an error
        # answer, not a 200 cut short.
        first = await anext(chunks)
    except Exception as exc:
        return await refuse(svc, call, exc)
    media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    headers = headers_for(call, {"content-disposition": f'attachment; filename="audit-export.{fmt}"'})
    return Stream(_exported(svc, call, first, chunks), media_type=media, headers=headers)


class ExportBroken(Exception):
    """Raised into the server when an export fails after its 200 went out, so
    the connection is dropped before the body's end: the client cannot take
    what it got for the whole export (CSV and JSON lines have no error event)."""


async def _exported(
    svc: Services, call: Call, first: query.Chunk, chunks: AsyncIterator[query.Chunk]
) -> AsyncIterator[bytes]:
    """Send an export, then audit how it ended.

    As with a stream of tokens (`gateway/calls.py`, `_relay`), the last chunk is
    held until the final record is committed: a client that received a whole
    export can rely on its record. An export the database breaks off, or whose
    record cannot be written, is cut short (`ExportBroken`); a client that goes
    away leaves a `client_closed` record, written by a task.
    """
    digest = hashlib.sha256()
    outcome, failure = "client_closed", None
    sent = 0  # records in the chunks handed to the server
    recorded = False

    def final_record() -> AuditRecord:
        call.detail["records"] = sent
        return call.final(
            outcome=outcome,
            http_status=200,
            error_type=failure.audit_reason if failure else None,
            error_message=failure.message if failure else None,
            response_sha256=None if call.capture == "none" else digest.hexdigest(),
        )

    held = first
    try:
        try:
            async for chunk in chunks:
                digest.update(held.data)
                yield held.data
                sent += held.records
                held = chunk
            outcome = "ok"
        except Exception as exc:  # not the client going away: that is a BaseException
            failure = as_gateway_error(exc)
            outcome = "error"
        if failure is None:  # the last chunk goes out once its record is in
            digest.update(held.data)
            sent += held.records
        recorded = True
        try:
            await svc.audit.write(final_record())
        except AuditUnavailable as exc:
            raise ExportBroken("the export's final record could not be written") from exc
        if failure is not None:
            raise ExportBroken(f"the export failed after {sent} records: {failure.message}")
        yield held.data
    finally:
        if not recorded:
            svc.spawn(write_quietly(svc.audit, final_record()))


async def event(request: Request[Any, Any, Any], svc: Services, request_id: str) -> Response[bytes]:
    """GET /admin/audit/events/{request_id}[?decrypt=true]: one call's records and payloads."""
    call = Call.begin(request, svc.proxies)
    try:
        principal = await authenticate(svc, request, call, AUDIT_ROLES)
        params = _params(request)
        decrypt = params.pop("decrypt", "false").lower()
        if params or decrypt not in ("true", "false"):
            raise BadRequest("The only parameter is decrypt=true|false.", audit_reason="invalid_query")
        records, rows = await query.call_records(svc.db, request_id)
        if not records:
            raise NotFound(f"No audit records for request {request_id}.", audit_reason="unknown_request")
        payloads = [{"part": r.part, "key_id": r.key_id, "size": r.size, "truncated": r.truncated} for r in rows]
        action = "lookup"
        if decrypt == "true":
            if not principal.can_decrypt:
                raise Forbidden("This key may not decrypt captured payloads.", audit_reason="decrypt_not_permitted")
            _decrypt_into(svc, payloads, rows, records)
            action = "decrypt"
        body = msgspec.json.encode({"request_id": request_id, "records": records, "payloads": payloads})
        detail = {"action": action, "request_id": request_id, "parts": [p["part"] for p in payloads]}
        # `answer` makes the record durable first: a decryption is on record before the plaintext leaves.
        return await answer(svc, call, body, detail)
    except Exception as exc:
        return await refuse(svc, call, exc)


def _decrypt_into(
    svc: Services, payloads: list[dict[str, Any]], rows: list[Any], records: list[dict[str, Any]]
) -> None:
    try:
        ring = load_keyring(svc.settings.audit_keyring_file)
    except KeyringError as exc:
        raise GatewayError(f"The payload keyring is unavailable: {exc}", audit_reason="keyring_unavailable") from None
    final = next((r for r in records if r["phase"] == "final"), {})
    for shown, row in zip(payloads, rows, strict=True):
        try:
            plain = open_payload(ring, row)
        except KeyringError as exc:
            shown["error"] = str(exc)
            continue
        try:
            shown["text"] = plain.decode()
        except UnicodeDecodeError:
            shown["base64"] = base64.b64encode(plain).decode()
        # The chained record's hash vouches for the plaintext (unless capture was cut short).
        shown["matches_record"] = hashlib.sha256(plain).hexdigest() == final.get(f"{row.part}_sha256")


async def stats(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    """GET /admin/audit/stats?bucket=hour&...: calls and tokens by bucket, model, team, outcome."""
    call = Call.begin(request, svc.proxies)
    try:
        await authenticate(svc, request, call, AUDIT_ROLES)
        params = _params(request)
        bucket = params.pop("bucket", "hour")
        f = query.parse_filter(params)
        data = await query.stats(svc.db, f, bucket)  # type: ignore[arg-type]
        body = msgspec.json.encode({"object": "list", "bucket": bucket, "data": data})
        return await answer(svc, call, body, {"action": "stats", "bucket": bucket, "filter": f.public()})
    except Exception as exc:
        return await refuse(svc, call, exc)


async def verify(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    """GET /admin/audit/verify: the whole trail, checked on a worker thread (the loop keeps serving)."""
    call = Call.begin(request, svc.proxies)
    try:
        await authenticate(svc, request, call, AUDIT_ROLES)
        if _params(request):
            # It checks the whole trail: a filter would not narrow it, and must not seem to.
            raise query.QueryError("/admin/audit/verify takes no parameters: it checks the whole trail.")
        try:
            trusted = audit_verify_keys(svc.settings)
        except ConfigError as exc:
            raise GatewayError(f"Audit keys unavailable: {exc}", audit_reason="audit_keys_unavailable") from None
        async with _verify_lock:  # one verification at a time
            report = await asyncio.to_thread(
                verify_database, svc.settings.database_url(), trusted, AnchorFile(svc.settings.audit_anchor_file)
            )
        summary = {"action": "verify", "intact": report.intact, "records": report.records}
        return await answer(svc, call, msgspec.json.encode(report.public()), summary)
    except Exception as exc:
        return await refuse(svc, call, exc)

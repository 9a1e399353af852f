"""The path of one call, from the caller's bytes to the audited answer.

    authenticate → read body (size-limited) → summarise → policy → route
    → rate limits → intent record committed → forward → relay → final record durable

Every way out of this path, allowed or refused, writes a final audit record.
When that record cannot be written, the caller gets 503 and nothing more.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from litestar import Request, Response

from gateway.audit.record import AuditRecord, detail_text, new_request_id
from gateway.audit.writer import write_quietly
from gateway.client_address import Networks, client_of
from gateway.cross_origin import cross_site
from gateway.errors import (
    AuditUnavailable,
    BadRequest,
    ContentDenied,
    EngineError,
    Forbidden,
    GatewayError,
    InternalError,
    LimiterDown,
    MethodNotAllowed,
    ModelNotFound,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
    PolicyDenied,
    PolicyLimitExceeded,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
)
from gateway.forward import EngineStream, Usage, error_of, usage_of
from gateway.keys import Principal
from gateway.media import MediaLimits, check_count, check_parts
from gateway.policies import rate_headers
from gateway.reasoning import event_without_reasoning, without_reasoning
from gateway.services import Services
from gateway.streaming import Stream
from gateway.summary import URL, ImagePart, Kind, RequestSummary, body_for_engine, prefix_cache_salt, summarize
from policy import Caller, Decision, Denial, Lease, LimiterUnavailable, MediaPart, Policy, Prompt, decide

log = structlog.get_logger("bastion.call")

INFERENCE_ROLES = frozenset({"user", "admin"})
ADMIN_ROLES = frozenset({"admin"})
JSON = "application/json"


@dataclass(slots=True)
class Call:
    """What the gateway knows about one call so far; becomes its audit records."""

    request_id: str
    method: str
    route: str
    # The caller's address: what the audit record and policy's client networks see.
    client_addr: str | None
    # The connection's own peer: the proxy, for a call a trusted proxy forwarded.
    peer_addr: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    claimed_key_id: str | None = None
    model: str | None = None
    manifest_sha256: str | None = None
    stream: bool = False
    request_sha256: str | None = None
    # The policy in force for this call, read once when the caller is known, so a
    # reload never gives one call the capture mode of one policy and the decision of another.
    policy: Policy | None = None
    # Payload capture mode (none | hash | encrypted), set from the caller's policy.
    capture: str | None = None
    # The record's `detail`: what policy decided ("policy"), a token or
    # certificate caller's identity ("auth"), what a handler did.
    detail: dict[str, Any] = field(default_factory=dict)
    # Sent with every answer to this call (x-ratelimit-*).
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Prompt plus completion tokens, once the engine has said (settles the rate limit).
    tokens_used: int | None = None
    # Remove the model's reasoning from the answer (the caller did not ask, or may not have it).
    strip_reasoning: bool = True

    @classmethod
    def begin(cls, request: Request[Any, Any, Any], proxies: Networks) -> Call:
        """A call's record begun: its id, and where it came from (gateway/client_address.py)."""
        peer = request.client.host if request.client else None
        client = client_of(peer, request.headers.getall("x-forwarded-for", []), proxies) if proxies else peer
        call = cls(
            request_id=new_request_id(),
            method=request.method,
            route=request.url.path,
            client_addr=client,
            peer_addr=peer,
        )
        if client != peer:
            call.detail["proxy"] = peer
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        return call

    def record(self, phase: str, **fields: Any) -> AuditRecord:
        p = self.principal
        if self.detail and "detail" not in fields:
            fields["detail"] = detail_text(self.detail)
        return AuditRecord(
            request_id=self.request_id,
            phase=phase,
            started_at=self.started_at,
            method=self.method,
            route=self.route,
            auth_method=p.auth_method if p else None,
            key_id=p.key_id if p else self.claimed_key_id,
            key_name=p.name if p else None,
            team=p.team if p else None,
            role=p.role if p else None,
            client_addr=self.client_addr,
            model=self.model,
            manifest_sha256=self.manifest_sha256,
            stream=self.stream,
            request_sha256=self.request_sha256,
            capture=self.capture,
            **fields,
        )

    def digest(self, data: bytes) -> str | None:
        """SHA-256 of a payload, unless the caller's team captures nothing."""
        return None if self.capture == "none" else hashlib.sha256(data).hexdigest()

    def refusal(self, err: GatewayError) -> AuditRecord:
        """The final record of a call that ends in `err`."""
        outcome = "refused" if err.status < 500 else "error"
        return self.final(
            outcome=outcome, http_status=err.status, error_type=err.audit_reason, error_message=err.message
        )

    def final(self, *, outcome: str, http_status: int, **fields: Any) -> AuditRecord:
        latency_ms = (time.perf_counter() - self.t0) * 1000
        log.info(
            "call",
            route=self.route,
            status=http_status,
            outcome=outcome,
            key_id=self.principal.key_id if self.principal else self.claimed_key_id,
            model=self.model,
            latency_ms=round(latency_ms, 3),
            error_type=fields.get("error_type"),
        )
        return self.record(
            "final",
            ended_at=datetime.now(UTC),
            outcome=outcome,
            http_status=http_status,
            latency_ms=latency_ms,
            **fields,
        )


# On every answer of a call: they hold prompts, completions and audit records,
# which no cache on the way (a proxy, a browser) may keep (OWASP ASVS 8.2.1),
# and a browser must not read as another type than the one sent.
_PRIVATE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def headers_for(call: Call, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"x-request-id": call.request_id, **_PRIVATE, **call.extra_headers}
    if extra:
        headers.update(extra)
    return headers


def error_response(call: Call, err: GatewayError) -> Response[bytes]:
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=headers_for(call, err.headers()))


async def refuse(svc: Services, call: Call, exc: Exception) -> Response[bytes]:
    """Audit a call that ends in an error, then answer with that error.

    Called in the `except Exception` block of every handler: a stage's own
    `GatewayError` is answered as it is; anything else is `as_gateway_error`'s
    500. If even that record cannot be written, the answer is 503 audit_unavailable.
    """
    err = as_gateway_error(exc)
    if isinstance(err, Unauthenticated):
        call.claimed_key_id = err.claimed_key_id
    try:
        await svc.audit.write(call.refusal(err))
    except AuditUnavailable as audit_err:
        return error_response(call, audit_err)
    return error_response(call, err)


def as_gateway_error(exc: Exception) -> GatewayError:
    """The error a call is answered and audited with: a stage's own, or 500
    internal_error for what no stage expects (a bug, a database error). Called
    in the `except` block: the traceback is logged for the operator; the caller
    learns nothing of it."""
    if isinstance(exc, GatewayError):
        return exc
    log.exception("call.internal_error")
    return InternalError("Internal gateway error.")


async def authenticate(svc: Services, request: Request[Any, Any, Any], call: Call, roles: frozenset[str]) -> Principal:
    principal = await svc.auth.authenticate(request.scope, request.headers, call.peer_addr)  # type: ignore[arg-type]
    call.principal = principal
    identity = principal.audit()
    if identity:
        call.detail["auth"] = identity
    call.policy = svc.policy
    call.capture = call.policy.capture_for(principal.team, principal.key_id) or svc.settings.audit.capture
    if cross_site(request.method, request.headers, reads_too=roles is not INFERENCE_ROLES):
        # After authentication, so the record names whose browser was used.
        raise Forbidden(
            f"A browser sent this request for a page of another site; {call.route} takes none.",
            audit_reason="cross_site_request",
        )
    if principal.role not in roles:
        raise Forbidden(f"The role '{principal.role}' may not use {call.route}.", audit_reason="role_not_allowed")
    return principal


async def read_body(request: Request[Any, Any, Any], limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit`:
    from Content-Length when given, else while counting a chunked body.

    All of it must arrive within `timeout` seconds (408 otherwise): a client
    trickling a body a byte at a time would hold its connection, and the
    call's slot in the rate limits, for as long as it liked.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Invalid Content-Length header.", audit_reason="bad_content_length")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout:g} seconds.", audit_reason="body_timeout"
        ) from None
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    # Made at the raise, never held in a local of the raising frame: that
    # frame is in the error's traceback, and the two would form a cycle
    # (garbage only the rarely run collector frees; tests/test_cyclic_garbage.py).
    return PayloadTooLarge(
        f"The request body is larger than the limit of {limit} bytes.", audit_reason="body_too_large"
    )


async def inference(request: Request[Any, Any, Any], svc: Services, kind: Kind, path: str) -> Response[Any]:
    call = Call.begin(request, svc.proxies)
    lease: Lease | None = None
    try:
        principal = await authenticate(svc, request, call, INFERENCE_ROLES)
        g = svc.settings.gateway
        body = await read_body(request, g.max_body_bytes, g.body_timeout_seconds)
        call.request_sha256 = call.digest(body)
        summary = summarize(kind, body)
        call.model, call.stream = summary.model, summary.stream
        if summary.choices > 1:
            call.detail["choices"] = summary.choices  # `n` (times a batch's prompts): what the call may cost
        media, fetched = await inspect_media(svc, call, principal, summary)
        decision = enforce(call, principal, summary.prompt(media))
        call.strip_reasoning = not (summary.return_reasoning and decision.reasoning)
        if summary.reasoning or summary.return_reasoning:
            call.detail["reasoning"] = {"enabled": summary.reasoning, "returned": not call.strip_reasoning}
        upstream = svc.upstreams.get(summary.model)
        if upstream is None:
            raise ModelNotFound(
                f"The model '{summary.model}' does not exist or you do not have access to it.", param="model"
            )
        state = svc.integrity.state(summary.model)
        call.manifest_sha256 = state.manifest_sha256
        if state.status not in ("verified", "unverified"):
            raise ModelUnavailable(
                f"The model '{summary.model}' is not available: its integrity check is {state.status}.",
                audit_reason=f"model_{state.status}",
            )
        lease = await admit(svc, call, decision)
        if svc.settings.audit.mode == "strict":
            # Nothing reaches the engine before this record is committed. A stream
            # sends content before its final record, so its intent is on disk
            # first; otherwise the final record's sync, before the answer is
            # released, takes this one to disk with it (gateway/audit/writer.py).
            await svc.audit.write(call.record("intent"), synced=summary.stream)
        payload = body_for_engine(
            body,
            summary,
            max_tokens=decision.max_tokens,
            texts=decision.texts,
            image_urls=fetched,
            cache_salt=prefix_cache_salt(g.prefix_cache_scope, principal.team, principal.key_id),
        )
        if summary.stream:
            stream = await svc.forwarder.open_stream(upstream, path, payload, call.request_id)
            if stream.status == 200:
                relay = _relay(svc, call, stream, body, lease, strip_usage=not summary.client_wants_usage)
                lease = None  # the relay settles it when the stream ends
                return Stream(relay, media_type="text/event-stream", headers=headers_for(call))
            try:
                answer = await stream.read()
            finally:
                stream.close()
            return await _finish(svc, call, stream.status, body, answer)
        status, answer = await svc.forwarder.post(upstream, path, payload, call.request_id)
        return await _finish(svc, call, status, body, answer)
    except Exception as exc:
        return await refuse(svc, call, exc)
    finally:
        if lease is not None:
            svc.spawn(settle(svc, lease, call.tokens_used))


async def inspect_media(
    svc: Services, call: Call, principal: Principal, summary: RequestSummary
) -> tuple[tuple[MediaPart, ...], dict[str, str]]:
    """Decode and check every media part (in a thread: images can take milliseconds);
    their types, sizes and SHA-256 go into the audit record.

    Image URLs on the operator's allow-list are fetched first and checked as
    the `data:` URLs they become; those are returned by JSON path, to be
    forwarded in place of the URLs. Before anything is fetched, policy sees
    the request with the sizes left open: a caller who may not send these
    images at all makes the gateway fetch nothing.
    """
    if not summary.media:
        return (), {}
    parts = list(summary.media)
    m = svc.settings.media
    check_count([param for param, _ in parts], m.max_parts)
    fetcher = svc.images
    remote = {
        param: part.image_url.url
        for param, part in parts
        if fetcher is not None and isinstance(part, ImagePart) and fetcher.allows(part.image_url.url)
    }
    fetched: dict[str, str] = {}
    if remote:
        assert fetcher is not None
        unsized = tuple(MediaPart("image" if isinstance(p, ImagePart) else "audio", 0, 0, 0) for _, p in parts)
        enforce(call, principal, summary.prompt(unsized))
        urls = await asyncio.gather(*(fetcher.as_data_url(url, param) for param, url in remote.items()))
        fetched = dict(zip(remote, urls, strict=True))
        parts = [(param, ImagePart(URL(fetched[param])) if param in fetched else part) for param, part in parts]
    limits = MediaLimits(max_image_pixels=m.max_image_pixels, max_audio_seconds=m.max_audio_seconds)
    media = await asyncio.to_thread(check_parts, parts, limits)
    call.detail["media"] = [
        {k: v for k, v in msgspec.structs.asdict(part).items() if v is not None}
        | ({"fetched_from": _without_query(remote[param])} if param in remote else {})
        for (param, _), part in zip(parts, media, strict=True)
    ]
    return media, fetched


def _without_query(url: str) -> str:
    """A fetched URL as the audit keeps it: no query or fragment (they may hold signed tokens)."""
    return url.split("#", 1)[0].split("?", 1)[0]


def enforce(call: Call, principal: Principal, prompt: Prompt) -> Decision:
    """Ask the call's policy; record its answer on the call; raise the refusal it implies."""
    policy = call.policy
    assert policy is not None, "authenticate() sets the call's policy"
    caller = Caller(key_id=principal.key_id, team=principal.team, client_addr=call.client_addr)
    decision = decide(policy, caller, prompt)
    call.detail["policy"] = {"sha256": policy.sha256, **decision.audit()}
    if decision.allowed:
        return decision
    reason, param = decision.reason, decision.param
    match decision.denial:
        case Denial.MODEL:
            raise ModelNotFound(reason, param="model", audit_reason="policy_denied")
        case Denial.TOO_LARGE | Denial.INVALID:
            raise PolicyLimitExceeded(reason, param=param, audit_reason="policy_limit")
        case Denial.CONTENT:
            raise ContentDenied(reason, param=param, audit_reason="content_denied")
        case _:
            raise PolicyDenied(reason, param=param, audit_reason="policy_denied")


_LIMIT_NAMES = {"requests": "requests per minute", "tokens": "tokens per minute", "concurrent": "concurrent requests"}


async def admit(svc: Services, call: Call, decision: Decision) -> Lease | None:
    """Take the call's rate-limit buckets, or refuse it with 429 (503 when the store is down)."""
    if not decision.buckets:
        return None
    try:
        admission = await svc.limiter.acquire(decision.buckets, call.request_id)
    except LimiterUnavailable as exc:
        log.error("ratelimit.unavailable", error=str(exc))
        raise LimiterDown(
            "Rate limits cannot be checked right now; the call was not made. Try again shortly.",
            audit_reason="rate_limiter_unavailable",
        ) from None
    headers = rate_headers(admission.levels)
    if admission.allowed:
        call.extra_headers.update(headers)
        return admission.lease
    b = admission.blocked
    assert b is not None
    call.detail["policy"].update(decision="deny", rule=b.rule.path, line=b.rule.line, bucket=b.name)
    scope = "team" if ":team:" in b.name else "key"
    if admission.never:
        raise PolicyLimitExceeded(
            f"This call would reserve {b.cost} tokens, more than this {scope}'s limit of {b.limit} tokens per minute.",
            param="max_tokens",
            audit_reason="rate_limited",
        )
    raise RateLimited(
        f"Rate limit reached for this {scope}: {b.limit} {_LIMIT_NAMES[b.kind]}. "
        f"Try again in {admission.retry_after:.1f} s.",
        limit="tokens" if b.kind == "tokens" else "requests",
        retry_after=admission.retry_after,
        limit_headers=headers,
        audit_reason="rate_limited",
    )


async def settle(svc: Services, lease: Lease, tokens_used: int | None) -> None:
    try:
        await svc.limiter.settle(lease, tokens_used)
    except LimiterUnavailable as exc:
        # Concurrency slots expire on their own; reserved tokens stay taken.
        log.warning("ratelimit.settle_failed", error=str(exc))


def _captured(svc: Services, call: Call, request: bytes, response: bytes) -> list[dict[str, Any]]:
    """Encrypted payload rows for a call whose team captures them; none otherwise."""
    if call.capture != "encrypted" or svc.sealer is None:
        return []
    return [
        svc.sealer.seal(call.request_id, "request", request),
        svc.sealer.seal(call.request_id, "response", response),
    ]


async def _finish(svc: Services, call: Call, status: int, body: bytes, answer: bytes) -> Response[bytes]:
    """Audit a complete (non-streamed) engine answer, then hand it over."""
    if status == 200 and call.strip_reasoning:
        try:
            answer = without_reasoning(answer)
        except ValueError as exc:
            raise _bad_answer(exc) from None
    fields: dict[str, Any] = {"response_sha256": call.digest(answer)}
    if status == 200:
        usage = usage_of(answer)
        if usage is not None:
            fields.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            call.tokens_used = usage.prompt_tokens + usage.completion_tokens
        outcome = "ok"
    else:
        call.tokens_used = 0
        error_type, message = error_of(answer)
        fields.update(error_type=f"engine:{error_type}", error_message=message)
        outcome = "refused" if status < 500 else "error"
    try:
        await svc.audit.write(
            call.final(outcome=outcome, http_status=status, **fields), _captured(svc, call, body, answer)
        )
    except AuditUnavailable as err:
        # The answer exists but cannot be accounted for: it is not served.
        return error_response(call, err)
    return Response(answer, status_code=status, media_type=JSON, headers=headers_for(call))


class _StreamChunk(msgspec.Struct, frozen=True):
    choices: list[msgspec.Raw] = []
    usage: Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_StreamChunk)


# vLLM's last event of a stream. It is held back until the call's final record is committed.
_DONE = b"data: [DONE]"
# How vLLM says a stream failed after its 200 went out (generation failed):
# `data: {"error": {...}}`, then `[DONE]`.
_ENGINE_ERROR = b'data: {"error"'


def _bad_answer(exc: Exception) -> EngineError:
    """An engine answer the gateway must read (usage, reasoning) that is not what vLLM sends."""
    log.warning("engine.bad_answer", reason=str(exc))
    return EngineError("The model engine's answer was malformed.", audit_reason="engine_bad_answer")


def _error_event(err: GatewayError) -> bytes:
    """An error as a stream's closing server-sent event, in OpenAI's shape."""
    return b"data: " + err.body() + b"\n\n"


async def _relay(
    svc: Services, call: Call, stream: EngineStream, body: bytes, lease: Lease | None, *, strip_usage: bool
) -> AsyncIterator[bytes]:
    """Relay the engine's events one by one, then audit the outcome.

    The stream's last event (`data: [DONE]`, or the error event when the
    engine broke off) is sent only once the final record is committed, as a
    non-streamed answer is: a client that saw a stream end can rely on its
    record, and its next call never queues behind it at the writer. If that
    record cannot be written, the client gets an `audit_unavailable` error
    event instead of `[DONE]`. A client that goes away mid-stream leaves a
    `client_closed` record, written by a task (this generator is being closed).
    """
    digest = hashlib.sha256()
    # Encrypted capture keeps what was sent, up to the capture limit.
    kept: list[bytes] | None = [] if call.capture == "encrypted" else None
    room = svc.settings.audit.capture_max_bytes + 1
    usage: Usage | None = None
    outcome, error_type, error_message = "client_closed", None, None
    closing: bytes | None = None
    recorded = False

    def final_record() -> AuditRecord:
        return call.final(
            outcome=outcome,
            http_status=200,
            error_type=error_type,
            error_message=error_message,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            response_sha256=None if call.capture == "none" else digest.hexdigest(),
        )

    def captured() -> list[dict[str, Any]]:
        return _captured(svc, call, body, b"".join(kept or []))

    def sent(event: bytes) -> bytes:
        nonlocal room
        digest.update(event)
        if kept is not None and room > 0:
            kept.append(event[:room])
            room -= len(kept[-1])
        return event

    try:
        try:
            async for event in stream.events():
                if event.startswith(_DONE):
                    closing = event
                    continue
                if event.startswith(_ENGINE_ERROR):
                    # Relayed as sent; the record says the call failed, not that it was answered.
                    engine_type, error_message = error_of(event[6:])
                    error_type = f"engine:{engine_type}"
                try:
                    if b'"usage":{' in event and event.startswith(b"data: "):
                        chunk = _chunk_decoder.decode(event[6:])
                        usage = chunk.usage or usage
                        if strip_usage and not chunk.choices:
                            continue  # the usage chunk the gateway asked for, not the client
                    if call.strip_reasoning:
                        event = event_without_reasoning(event)
                except (ValueError, RecursionError) as exc:  # msgspec's DecodeError is a ValueError
                    raise _bad_answer(exc) from None
                yield sent(event)
            outcome = "ok" if error_type is None else "error"
        except Exception as exc:  # not the client going away: that is a BaseException
            err = as_gateway_error(exc)
            outcome, error_type, error_message = "error", err.audit_reason, err.message
            closing = _error_event(err)
        if closing is not None:
            sent(closing)
        # Handed to the writer: from here the record lands even if the client goes away.
        recorded = True
        try:
            await svc.audit.write(final_record(), captured())
        except AuditUnavailable as err:
            closing = _error_event(err)
        if closing is not None:
            yield closing
    finally:
        # Closing drops the engine connection, so a client that went away
        # aborts the engine's work too. That record is written by a task, not an
        # await: this generator is being closed, and the record must land.
        stream.close()
        if not recorded:
            svc.spawn(write_quietly(svc.audit, final_record(), captured()))
        if lease is not None:
            svc.spawn(settle(svc, lease, usage.prompt_tokens + usage.completion_tokens if usage else None))


async def list_models(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    call = Call.begin(request, svc.proxies)
    try:
        principal = await authenticate(svc, request, call, INFERENCE_ROLES)
    except Exception as exc:
        return await refuse(svc, call, exc)
    created = int(svc.started_at.timestamp())
    # Only the models this caller's policy allows (none without a policy).
    assert call.policy is not None, "authenticate() sets the call's policy"
    rules = call.policy.rules_for(principal.team, principal.key_id)
    allowed = [n for n in svc.upstreams if rules and all(m.allows(n) for m in rules.models)]
    data = [{"id": name, "object": "model", "created": created, "owned_by": "bastion"} for name in allowed]
    return await answer(svc, call, msgspec.json.encode({"object": "list", "data": data}))


async def verify_models(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    """POST /admin/models/verify: re-verify every model now; answer with their states."""
    call = Call.begin(request, svc.proxies)
    try:
        await authenticate(svc, request, call, ADMIN_ROLES)
        await svc.integrity.verify_all("admin")
    except Exception as exc:
        return await refuse(svc, call, exc)
    return await answer(
        svc, call, msgspec.json.encode({"models": {n: s.public() for n, s in svc.integrity.states.items()}})
    )


async def answer(svc: Services, call: Call, body: bytes, detail: dict[str, Any] | None = None) -> Response[bytes]:
    """Audit a successful call the gateway answers itself (with what it did, in `detail`), then answer."""
    call.detail.update(detail or {})
    try:
        await svc.audit.write(call.final(outcome="ok", http_status=200, response_sha256=call.digest(body)))
    except AuditUnavailable as err:
        return error_response(call, err)
    return Response(body, media_type=JSON, headers=headers_for(call))


async def wrong_method(request: Request[Any, Any, Any], svc: Services, allowed: Sequence[str]) -> Response[bytes]:
    call = Call.begin(request, svc.proxies)
    err = MethodNotAllowed(
        f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}.",
        allowed=allowed,
        audit_reason="method_not_allowed",
    )
    return await refuse(svc, call, err)


def refuse_unparsed(svc: Services, client_addr: str | None, err: GatewayError) -> str:
    """Audit a request the HTTP server refused before it was one (not valid
    HTTP, or a head over the limit: gateway/http_protocol.py); returns its request id.

    The server answers at once and closes the connection, so the record is
    written by a task: nothing was forwarded, and nobody waits on it.
    """
    call = Call(request_id=new_request_id(), method="-", route="-", client_addr=client_addr)
    svc.spawn(write_quietly(svc.audit, call.refusal(err)))
    return call.request_id


def canonical_path(raw_path: bytes, path: str) -> bool:
    """Whether a request's path was sent as the gateway matches it: with no
    percent-encoding (`/%61dmin`, `/admin%2Faudit`), no empty segment (`//admin`)
    and no trailing slash.

    The router would take each of those for the plain path. A proxy in front
    that keeps a prefix away from some clients (`/admin/`), matching on the path
    as sent (Envoy's and many load balancers' default), would not, and such a
    request would pass it to reach the route it was kept from.
    """
    return raw_path == path.encode() and b"//" not in raw_path and (raw_path == b"/" or raw_path[-1:] != b"/")


async def noncanonical_path(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    call = Call.begin(request, svc.proxies)
    call.route = request.scope["raw_path"].decode("latin-1")  # as sent: what a proxy in front saw
    err = NotFound(
        f"Unknown route: {request.method} {call.route}. Paths are matched as written: "
        "no percent-encoding, repeated or trailing slashes.",
        code="unknown_url",
        audit_reason="noncanonical_path",
    )
    return await refuse(svc, call, err)


async def not_found(request: Request[Any, Any, Any], svc: Services) -> Response[bytes]:
    call = Call.begin(request, svc.proxies)
    err = NotFound(
        f"Unknown route: {request.method} {request.url.path}", code="unknown_url", audit_reason="unknown_route"
    )
    return await refuse(svc, call, err)

"""Forwarding to the engine over one pooled HTTP client.

The engine is reached with its own API key (never the caller's); transport
failures become typed gateway errors: cannot connect → 503, no answer in time →
504, a broken or nonsensical answer → 502.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import structlog

from gateway.engine_http import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    EnginePool,
    Origin,
    ReadTimeout,
    Response,
    TooLarge,
    TransportError,
)
from gateway.errors import EngineError, EngineTimeout, EngineUnavailable, GatewayError

log = structlog.get_logger("bastion.engine")
_HEALTH_MAX_BYTES = 64 * 1024  # vLLM's /health answers with an empty body


# A token count as the engine reports it, bounded to what the audit trail can
# hold (an SQL integer): a count out of range does not decode, so it never
# reaches the writer, where it would fail the whole batch it is committed with.
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0


class _WithUsage(msgspec.Struct, frozen=True):
    usage: Usage | None = None


class _UpstreamError(msgspec.Struct, frozen=True):
    type: str | None = None
    param: str | None = None


class _WithError(msgspec.Struct, frozen=True):
    error: _UpstreamError | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)
_error_decoder = msgspec.json.Decoder(_WithError)


def usage_of(body: bytes) -> Usage | None:
    """The `usage` object of an engine answer (or of one stream event), if any."""
    try:
        return _usage_decoder.decode(body).usage
    except (msgspec.DecodeError, RecursionError):
        return None


# The field an engine error is about: the first name of its `param`
# (`body.temperature`, `logit_bias`, `body.messages.0.content` → `messages`).
# Lower-case letters only: the engine's schema names its fields so, and a
# caller's key further along (`body.logit_bias.<key>`) is not taken.
_FIELD = re.compile(r"(?:body\.)?([a-z_]{1,64})(?:$|[.\[])")


def error_of(body: bytes) -> tuple[str, str]:
    """(type, message) of an OpenAI-shaped engine error, for the audit record.

    The message is the gateway's, naming the field the engine's `param` names.
    The engine's own message is not kept: it quotes the caller's values
    (pydantic's `'input': '4111 1111 1111 1111'`, vLLM's `value=[...]`), and
    the trail holds no request text beyond what the caller's capture mode
    keeps. It still reaches the caller, in the answer the record hashes.
    """
    try:
        err = _error_decoder.decode(body).error
    except (msgspec.DecodeError, RecursionError):
        err = None
    if err is None:
        return "engine_error", ""
    field = _FIELD.match(err.param or "")
    about = f" about '{field.group(1)}'" if field else ""
    message = f"The engine's error{about}; its message is not recorded (it may quote the request)."
    return (err.type or "engine_error")[:100], message


@dataclass(slots=True)
class Upstream:
    """The engine of one deployment, as the forwarder sees it."""

    base_url: str
    api_key: str
    origin: Origin = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        headers = {"authorization": f"Bearer {self.api_key}", "content-type": "application/json"}
        self.origin = Origin.of(self.base_url, headers)


def _translate(exc: TransportError) -> GatewayError:
    # The caller is told only that the engine failed; the operator, why.
    log.warning("engine.transport_error", reason=str(exc))
    if isinstance(exc, ConnectTimeout):
        return EngineUnavailable("The model engine is not reachable right now.", audit_reason="engine_connect_timeout")
    if isinstance(exc, ConnectFailed):
        return EngineUnavailable("The model engine is not reachable right now.", audit_reason="engine_connect_failed")
    if isinstance(exc, ReadTimeout):
        return EngineTimeout("The model engine did not answer in time.", audit_reason="engine_read_timeout")
    if isinstance(exc, BadResponse):
        return EngineError("The model engine's answer was not HTTP.", audit_reason="engine_bad_response")
    if isinstance(exc, TooLarge):
        return EngineError("The model engine's answer was too large.", audit_reason="engine_answer_too_large")
    return EngineError("The model engine's answer was broken off.", audit_reason="engine_broken_off")


class EngineStream:
    """An engine answer whose body is still arriving."""

    def __init__(self, response: Response, max_bytes: int):
        self._response = response
        self._max_bytes = max_bytes
        self.status = response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read(self._max_bytes)
        except TransportError as exc:
            raise _translate(exc) from None

    async def events(self) -> AsyncIterator[bytes]:
        """Yield each server-sent event (with its blank-line terminator) as it completes.

        Raises typed gateway errors when the engine breaks off mid-stream, or
        sends an event over the size limit (a stream may be long; one event is
        what the gateway holds at a time).
        """
        buffer = b""
        try:
            async for chunk in self._response.chunks():
                # Look for the end of an event only in what is new (and the byte
                # before it): scanning the whole buffer each time is quadratic.
                start = max(0, len(buffer) - 1)
                buffer += chunk
                while (end := buffer.find(b"\n\n", start)) >= 0:
                    self._check_event(end + 2)
                    yield buffer[: end + 2]
                    buffer = buffer[end + 2 :]
                    start = 0
                self._check_event(len(buffer))  # an event still arriving
        except TransportError as exc:
            raise _translate(exc) from None
        if buffer.strip():
            yield buffer

    def _check_event(self, size: int) -> None:
        if size > self._max_bytes:
            self._response.close()
            raise TooLarge(f"an event of the engine's stream is over {self._max_bytes} bytes")

    def close(self) -> None:
        """Let the engine connection go; dropped if the answer is not complete,
        so the engine sees the client go and aborts the request."""
        self._response.close()


class Forwarder:
    """Every call to the engines, over one pool of keep-alive connections (gateway/engine_http.py)."""

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, pool_size: int, keepalive: float, max_answer_bytes: int
    ):
        self._pool = EnginePool(
            connect_timeout=connect_timeout, read_timeout=read_timeout, size=pool_size, keepalive=keepalive
        )
        # An engine is untrusted input too: what one call may make the gateway hold.
        self._max_answer_bytes = max_answer_bytes
        # Why each engine last failed its health check: logged when that changes,
        # not at every probe of /readyz while an engine stays down.
        self._unhealthy: dict[str, str] = {}

    async def close(self) -> None:
        await self._pool.close()

    async def post(self, upstream: Upstream, path: str, body: bytes, request_id: str) -> tuple[int, bytes]:
        """Send a non-streamed call and read the whole answer.

        `request_id` (the call's audit id) goes as `X-Request-Id`, which vLLM
        takes for its own request id over the body's `request_id`: the engine's request
        log and the answer's `id` (`chatcmpl-<id>`) name the audit
        record, and no caller chooses what the engine calls a request.
        """
        try:
            response = await self._pool.request(upstream.origin, "POST", path, body, request_id)
            return response.status, await response.read(self._max_answer_bytes)
        except TransportError as exc:
            raise _translate(exc) from None

    async def open_stream(self, upstream: Upstream, path: str, body: bytes, request_id: str) -> EngineStream:
        """Send a streamed call (`request_id` as in `post`); return once the status line and headers are in."""
        try:
            response = await self._pool.request(upstream.origin, "POST", path, body, request_id)
        except TransportError as exc:
            raise _translate(exc) from None
        return EngineStream(response, self._max_answer_bytes)

    async def health(self, upstream: Upstream, timeout: float = 2.0) -> bool:
        reason = ""
        try:
            async with asyncio.timeout(timeout):
                response = await self._pool.request(upstream.origin, "GET", "/health")
                await response.read(_HEALTH_MAX_BYTES)
            if response.status != 200:
                reason = f"/health answered {response.status}"
        except TransportError as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"no answer within {timeout:g} s"
        self._note_health(upstream.base_url, reason)
        return not reason

    def _note_health(self, engine_url: str, reason: str) -> None:
        before = self._unhealthy.pop(engine_url, "")
        if reason:
            self._unhealthy[engine_url] = reason
            if reason != before:
                log.warning("engine.unhealthy", engine_url=engine_url, reason=reason)
        elif before:
            log.info("engine.healthy", engine_url=engine_url)

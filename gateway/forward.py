"""Forwarding to the engine over one pooled HTTP client.

The engine is reached with its own API key (never the caller's); transport
failures become typed gateway errors: cannot connect → 503, no answer in time →
504, a broken or nonsensical answer → 502.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import msgspec

from gateway.errors import EngineError, EngineTimeout, EngineUnavailable, GatewayError


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct, frozen=True):
    usage: Usage | None = None


class _UpstreamError(msgspec.Struct, frozen=True):
    type: str | None = None
    message: str | None = None


class _WithError(msgspec.Struct, frozen=True):
    error: _UpstreamError | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)
_error_decoder = msgspec.json.Decoder(_WithError)


def usage_of(body: bytes) -> Usage | None:
    """The `usage` object of an engine answer (or of one stream event), if any."""
    try:
        return _usage_decoder.decode(body).usage
    except msgspec.DecodeError:
        return None


def error_of(body: bytes) -> tuple[str, str]:
    """(type, message) of an OpenAI-shaped error body, best effort."""
    try:
        err = _error_decoder.decode(body).error
    except msgspec.DecodeError:
        err = None
    if err is None:
        return "engine_error", ""
    return err.type or "engine_error", (err.message or "")[:500]


@dataclass(slots=True)
class Upstream:
    """The engine of one deployment, as the forwarder sees it."""

    base_url: str
    api_key: str
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.headers = {"authorization": f"Bearer {self.api_key}", "content-type": "application/json"}


def _translate(exc: httpx.HTTPError) -> GatewayError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return EngineUnavailable("The model engine is not reachable right now.", audit_reason="engine_connect_timeout")
    if isinstance(exc, httpx.TimeoutException):
        return EngineTimeout("The model engine did not answer in time.", audit_reason="engine_read_timeout")
    if isinstance(exc, httpx.ConnectError):
        return EngineUnavailable("The model engine is not reachable right now.", audit_reason="engine_connect_failed")
    return EngineError("The model engine's answer was broken off.", audit_reason=f"engine_{type(exc).__name__}")


class Forwarder:
    def __init__(self, *, connect_timeout: float, read_timeout: float, pool_size: int):
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            # The engine is ours; never pick up proxies from the environment.
            trust_env=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, upstream: Upstream, path: str, body: bytes) -> httpx.Response:
        """Send a non-streamed call and read the whole answer."""
        try:
            return await self._client.post(upstream.base_url + path, content=body, headers=upstream.headers)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    async def open_stream(self, upstream: Upstream, path: str, body: bytes) -> httpx.Response:
        """Send a streamed call; return once the status line and headers are in."""
        request = self._client.build_request("POST", upstream.base_url + path, content=body, headers=upstream.headers)
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    async def health(self, upstream: Upstream, timeout: float = 2.0) -> bool:
        try:
            r = await self._client.get(upstream.base_url + "/health", headers=upstream.headers, timeout=timeout)
        except httpx.HTTPError:
            return False
        return r.status_code == 200


async def sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """Yield each server-sent event (with its blank-line terminator) as it completes.

    Raises typed gateway errors when the engine breaks off mid-stream.
    """
    buffer = b""
    try:
        async for chunk in response.aiter_raw():
            buffer += chunk
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                yield buffer[: end + 2]
                buffer = buffer[end + 2 :]
    except httpx.HTTPError as exc:
        raise _translate(exc) from exc
    if buffer.strip():
        yield buffer

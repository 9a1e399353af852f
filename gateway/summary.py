"""Parse a request body once into the small typed summary every stage reads.

msgspec decodes only the fields declared here and skips the rest without
building Python objects for them, so the gateway pays for what it reads.
Type errors come back with the JSON path of the bad field, which becomes the
OpenAI error's `param`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from gateway.errors import BadRequest

Kind = Literal["chat", "completions"]


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class Message(msgspec.Struct, frozen=True):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(msgspec.Struct, frozen=True):
    model: str
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class CompletionBody(msgspec.Struct, frozen=True):
    model: str
    # A string, a list of strings, token ids, or lists of token ids.
    prompt: str | list[str | int | list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None


class RequestSummary(msgspec.Struct, frozen=True):
    kind: Kind
    model: str
    stream: bool
    # Whether the client itself asked for the usage chunk of a stream.
    client_wants_usage: bool
    # Whether the body already carries a `stream_options` key.
    has_stream_options: bool
    max_tokens: int | None


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_DECODERS = {
    "chat": msgspec.json.Decoder(ChatBody),
    "completions": msgspec.json.Decoder(CompletionBody),
}


def summarize(kind: Kind, body: bytes) -> RequestSummary:
    if not body.strip():
        raise BadRequest("The request body is empty; expected a JSON object.", audit_reason="empty_body")
    try:
        parsed: ChatBody | CompletionBody = _DECODERS[kind].decode(body)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        param = match.group(1) if match else None
        raise BadRequest(f"Invalid request: {exc}", param=param or None, audit_reason="invalid_body") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", audit_reason="malformed_json") from None
    if not parsed.model:
        raise BadRequest("'model' must not be empty.", param="model", audit_reason="invalid_body")
    if isinstance(parsed, ChatBody) and not parsed.messages:
        raise BadRequest("'messages' must not be empty.", param="messages", audit_reason="invalid_body")
    max_tokens = parsed.max_tokens
    if isinstance(parsed, ChatBody) and parsed.max_completion_tokens is not None:
        max_tokens = parsed.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1.", param="max_tokens", audit_reason="invalid_body")
    options = parsed.stream_options
    return RequestSummary(
        kind=kind,
        model=parsed.model,
        stream=parsed.stream,
        client_wants_usage=bool(options and options.include_usage),
        has_stream_options=options is not None or b'"stream_options"' in body,
        max_tokens=max_tokens,
    )


def body_for_engine(body: bytes, summary: RequestSummary) -> bytes:
    """The bytes sent to the engine: the client's own, except that every stream
    asks for usage, so its tokens always reach the audit trail.

    With no `stream_options` in the body the field is spliced in after the
    opening brace and nothing else is touched; only a body that already has
    `stream_options` (asking for no usage) is re-encoded.
    """
    if not summary.stream or summary.client_wants_usage:
        return body
    if not summary.has_stream_options:
        start = body.index(b"{") + 1
        return body[:start] + b'"stream_options":{"include_usage":true},' + body[start:]
    data = msgspec.json.decode(body)
    options = data.get("stream_options") or {}
    data["stream_options"] = {**options, "include_usage": True}
    return msgspec.json.encode(data)

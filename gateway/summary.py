"""Parse a request body once into the small typed summary every stage reads.

msgspec decodes only the fields declared here and skips the rest without
building Python objects for them, so the gateway pays for what it reads.
Type errors come back with the JSON path of the bad field, which becomes the
OpenAI error's `param`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec

from gateway.errors import BadRequest
from policy import MediaPart, Prompt

Kind = Literal["chat", "completions"]

# How many choices the engine generates for each prompt (`n`): each is up to
# max_tokens long, so a call's cost is counted with it (policy/decide.py).
Choices = Annotated[int, msgspec.Meta(ge=1)]


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


# A field held as raw JSON (no Python objects built), only to say it is there:
# text for the chat template that the gateway does not read (a key with content
# rules is refused a call carrying any: policy/decide.py), or a part's uuid.
_NO_RAW = msgspec.Raw()


# Content parts, told apart by their `type`. A part of any other type is
# refused (400): what the gateway cannot read, policy cannot check.
#
# A part's `uuid` is vLLM's, and refused: the engine takes it as the media's
# identity in its caches in place of a hash of the media (another caller's
# media cached under the same uuid answers for this one), and reads a part that
# has one by its other keys, whatever its `type` says (a `text` part with an
# `input_audio` key is audio to the engine). Held raw, only to see it.
class TextPart(msgspec.Struct, frozen=True, tag="text", tag_field="type"):
    text: str
    uuid: msgspec.Raw = _NO_RAW


class URL(msgspec.Struct, frozen=True):
    url: str


class ImagePart(msgspec.Struct, frozen=True, tag="image_url", tag_field="type"):
    image_url: URL
    uuid: msgspec.Raw = _NO_RAW


class InputAudio(msgspec.Struct, frozen=True):
    data: str
    format: str = "wav"


class AudioPart(msgspec.Struct, frozen=True, tag="input_audio", tag_field="type"):
    input_audio: InputAudio
    uuid: msgspec.Raw = _NO_RAW


class AudioURLPart(msgspec.Struct, frozen=True, tag="audio_url", tag_field="type"):
    audio_url: URL
    uuid: msgspec.Raw = _NO_RAW


Part = TextPart | ImagePart | AudioPart | AudioURLPart


# The roles OpenAI's API takes. vLLM also takes any other string and the chat
# template writes it into the prompt as it is: text no content rule read, and a
# place to forge turns (`user<|im_end|>...`). Refused, as OpenAI refuses it, by
# `_check_messages`, whose message names the roles taken.
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Message(msgspec.Struct, frozen=True):
    role: str
    content: str | list[Part] | None = None
    name: msgspec.Raw = _NO_RAW
    tool_calls: msgspec.Raw = _NO_RAW
    tool_call_id: msgspec.Raw = _NO_RAW
    function_call: msgspec.Raw = _NO_RAW
    reasoning_content: msgspec.Raw = _NO_RAW
    reasoning: msgspec.Raw = _NO_RAW
    # vLLM passes a developer message's `tools` and any message's `task` (a
    # marker some templates render) to the chat template too.
    tools: msgspec.Raw = _NO_RAW
    task: msgspec.Raw = _NO_RAW


class ChatBody(msgspec.Struct, frozen=True):
    model: str
    messages: list[Message]
    stream: bool = False
    # UNSET, not None, when absent: `null` is a value the engine reads too.
    stream_options: StreamOptions | None | msgspec.UnsetType = msgspec.UNSET
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: Choices | None = None
    # Reasoning: top-level (LangChain's extra_body) or vLLM's chat template argument.
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's effort; vLLM turns thinking on for any but "none" when nothing
    # sets `enable_thinking` (and validates the value itself).
    reasoning_effort: str | None = None
    # Bastion's own: send the model's reasoning back (default: keep it from the client).
    return_reasoning: bool | None = None
    tools: msgspec.Raw = _NO_RAW
    functions: msgspec.Raw = _NO_RAW
    documents: msgspec.Raw = _NO_RAW
    chat_template: msgspec.Raw = _NO_RAW
    cache_salt: msgspec.Raw = _NO_RAW


class CompletionBody(msgspec.Struct, frozen=True):
    model: str
    # A string, a list of strings, token ids, or lists of token ids.
    prompt: str | list[str | int | list[int]]
    stream: bool = False
    stream_options: StreamOptions | None | msgspec.UnsetType = msgspec.UNSET
    max_tokens: int | None = None
    n: Choices | None = None
    # vLLM's prompt as embeddings (with --enable-prompt-embeds): unreadable like token ids.
    prompt_embeds: msgspec.Raw = _NO_RAW
    # The text after the gap, which vLLM renders into the prompt for a model
    # that fills in the middle (and refuses for any other).
    suffix: msgspec.Raw = _NO_RAW
    cache_salt: msgspec.Raw = _NO_RAW


class RequestSummary(msgspec.Struct, frozen=True):
    kind: Kind
    model: str
    stream: bool
    # Whether the client itself asked for the usage chunk of a stream.
    client_wants_usage: bool
    # Whether the body already carries a `stream_options` key.
    has_stream_options: bool
    max_tokens: int | None
    # Completions the engine generates, each up to max_tokens: `n` times the
    # prompts of a completions call's batch.
    choices: int = 1
    # Every text of the request in walk order (see `_texts_of`), for policy.
    texts: tuple[str, ...] = ()
    token_ids: bool = False
    # Media parts as sent, with their JSON paths; gateway.media checks them.
    media: tuple[tuple[str, Part], ...] = ()
    # Thinking asked for (either way of asking), and its reasoning wanted back.
    reasoning: bool = False
    return_reasoning: bool = False
    # The body has top-level `enable_thinking`/`return_reasoning`, which vLLM does
    # not read: they are moved (or dropped) on the way to the engine.
    thinking_fields: bool = False
    # Where text reaches the prompt that `texts` does not hold (tools, tool
    # calls, template arguments), as JSON paths.
    unread: tuple[str, ...] = ()
    # The body has a `cache_salt` key (however its name is escaped): the
    # gateway's salt must replace it, not be spliced in beside it.
    has_cache_salt: bool = False

    def prompt(self, media: tuple[MediaPart, ...] = ()) -> Prompt:
        """What policy reads of this request, with its media parts as checked."""
        return Prompt(
            model=self.model,
            stream=self.stream,
            max_tokens=self.max_tokens,
            choices=self.choices,
            reasoning=self.reasoning,
            texts=self.texts,
            token_ids=self.token_ids,
            unread=self.unread,
            media=media,
        )


# msgspec ends a message with the path of what it refused; a message for a bad
# value (an unknown part `type`) quotes that value first: the caller's text.
_PATH_RE = re.compile(r" - at `\$\.?([^`]*)`$")
_QUOTING = ("Invalid enum value", "Invalid value")
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
        message, param = _refusal(str(exc))
        raise BadRequest(f"Invalid request: {message}", param=param, audit_reason="invalid_body") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", audit_reason="malformed_json") from None
    except RecursionError:
        raise BadRequest("The request body nests JSON too deeply.", audit_reason="malformed_json") from None
    if not parsed.model:
        raise BadRequest("'model' must not be empty.", param="model", audit_reason="invalid_body")
    if isinstance(parsed, ChatBody):
        _check_messages(parsed.messages)
    max_tokens = parsed.max_tokens
    if isinstance(parsed, ChatBody) and parsed.max_completion_tokens is not None:
        max_tokens = parsed.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1.", param="max_tokens", audit_reason="invalid_body")
    options = parsed.stream_options
    if isinstance(parsed, ChatBody):
        texts, media = _chat_inputs(parsed.messages)
        token_ids = False
        kwargs = parsed.chat_template_kwargs or {}
        if not isinstance(kwargs.get("enable_thinking"), bool | None):
            # A template tests it as it is (`{% if enable_thinking %}`): "no" or 1 would turn thinking on unseen.
            raise BadRequest(
                "'chat_template_kwargs.enable_thinking' must be true, false or null.",
                param="chat_template_kwargs.enable_thinking",
                audit_reason="invalid_body",
            )
        reasoning = parsed.enable_thinking is True or kwargs.get("enable_thinking") is True or _effort_thinks(parsed)
        return_reasoning = parsed.return_reasoning is True
        thinking_fields = parsed.enable_thinking is not None or parsed.return_reasoning is not None
        unread = _unread_fields(parsed)
        batch = 1
    else:
        prompts = [parsed.prompt] if isinstance(parsed.prompt, str) else parsed.prompt
        texts = tuple(p for p in prompts if isinstance(p, str))
        token_ids, media, reasoning = len(texts) != len(prompts), (), False
        # A list of strings or of token-id lists is a batch, one completion
        # each; a flat list of token ids is one prompt.
        batch = sum(1 for p in prompts if not isinstance(p, int)) or 1
        return_reasoning = thinking_fields = False
        unread = tuple(name for name in ("prompt_embeds", "suffix") if _carries(getattr(parsed, name)))
    return RequestSummary(
        kind=kind,
        model=parsed.model,
        stream=parsed.stream,
        client_wants_usage=bool(options and options.include_usage),
        # Decoded, not searched for in the bytes: a key spelled with escapes
        # (`stream\u005foptions`) is the same key to the engine.
        has_stream_options=options is not msgspec.UNSET,
        max_tokens=max_tokens,
        choices=(parsed.n or 1) * batch,
        texts=texts,
        token_ids=token_ids,
        media=media,
        reasoning=reasoning,
        return_reasoning=return_reasoning,
        thinking_fields=thinking_fields,
        unread=unread,
        has_cache_salt=bytes(parsed.cache_salt) != b"",
    )


def _refusal(message: str) -> tuple[str, str | None]:
    """msgspec's message, without any value it quotes, and the path it names.

    The message is answered and written into the audit record, which must not
    hold what a caller put where the gateway takes none of it (a card number as
    a part's `type`); and a quoted value could end in a path of its own.
    """
    match = _PATH_RE.search(message)
    where, param = (match.group(0), match.group(1) or None) if match else ("", None)
    if message.startswith(_QUOTING):
        message = "Invalid value" + where
    return message, param


def _carries(raw: msgspec.Raw) -> bool:
    return bytes(raw) not in (b"", b"null", b"[]", b"{}", b'""')


_MESSAGE_UNREAD = (
    "name",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "reasoning_content",
    "reasoning",
    "tools",
    "task",
)


def _effort_thinks(body: ChatBody) -> bool:
    """Whether `reasoning_effort` turns thinking on: vLLM sets the template's
    `enable_thinking` from it unless the kwargs it sees (with a top-level
    `enable_thinking` moved there, see `body_for_engine`) already name it."""
    if body.reasoning_effort in (None, "none"):
        return False
    return body.enable_thinking is None and "enable_thinking" not in (body.chat_template_kwargs or {})


def _unread_fields(body: ChatBody) -> tuple[str, ...]:
    """JSON paths of the fields with text for the prompt that the gateway does not read."""
    unread = [name for name in ("tools", "functions", "documents", "chat_template") if _carries(getattr(body, name))]
    # Any template argument but the thinking switch may be rendered into the
    # prompt. Named by the field alone: its keys are the caller's text, and the
    # path is quoted in the refusal and its audit record.
    if any(k != "enable_thinking" for k in body.chat_template_kwargs or {}):
        unread.append("chat_template_kwargs")
    for i, m in enumerate(body.messages):
        unread += [f"messages[{i}].{name}" for name in _MESSAGE_UNREAD if _carries(getattr(m, name))]
    return tuple(unread)


def _check_messages(messages: list[Message]) -> None:
    if not messages:
        raise BadRequest("'messages' must not be empty.", param="messages", audit_reason="invalid_body")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of: {', '.join(ROLES)}.",
                param=f"messages[{i}].role",
                audit_reason="invalid_body",
            )


def _chat_inputs(messages: list[Message]) -> tuple[tuple[str, ...], tuple[tuple[str, Part], ...]]:
    """The texts (in walk order: message by message, part by part) and media parts."""
    texts: list[str] = []
    media: list[tuple[str, Part]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            texts.append(m.content)
        elif m.content:
            for j, part in enumerate(m.content):
                param = f"messages[{i}].content[{j}]"
                # Any value but null: vLLM takes "" or 0 as an identity too.
                if bytes(part.uuid) not in (b"", b"null"):
                    raise BadRequest(
                        f"'{param}.uuid' is not accepted: the engine would take it as the media's identity "
                        "in its caches, and read the part by its other keys whatever its type.",
                        param=f"{param}.uuid",
                        audit_reason="invalid_body",
                    )
                if isinstance(part, TextPart):
                    texts.append(part.text)
                else:
                    media.append((param, part))
    return tuple(texts), tuple(media)


# The JSON path summarize() gives a content part: messages[i].content[j].
_PART_PATH = re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]")


def body_for_engine(
    body: bytes,
    summary: RequestSummary,
    *,
    max_tokens: int | None = None,
    texts: tuple[str, ...] | None = None,
    image_urls: dict[str, str] | None = None,
    cache_salt: str | None = None,
) -> bytes:
    """The bytes sent to the engine: the client's own, except where policy or
    the audit trail needs a change.

    - `cache_salt` (the gateway's, see `prefix_cache_salt`) replaces any the
      client sent; with none in the body it is spliced in after the opening
      brace and nothing else is touched.
    - Every stream asks for usage, so its tokens always reach the audit trail.
      With no `stream_options` in the body the field is spliced in after the
      opening brace and nothing else is touched.
    - `max_tokens` (policy's cap) and `texts` (policy's redactions, in the
      order of `summary.texts`) re-encode the body.
    - `image_urls` (images the gateway fetched, by JSON path such as
      `messages[0].content[1]`) replace those parts' URLs with `data:` URLs.
    - Top-level `enable_thinking` (how LangChain's `extra_body` sends it) is
      moved to `chat_template_kwargs`, the channel vLLM passes to the chat
      template; `return_reasoning` is the gateway's and is dropped.
    """
    wants_usage = summary.stream and not summary.client_wants_usage
    unchanged = max_tokens is None and texts is None and not image_urls and not summary.thinking_fields
    if unchanged and not (cache_salt and summary.has_cache_salt) and not (wants_usage and summary.has_stream_options):
        spliced = b'"cache_salt":' + msgspec.json.encode(cache_salt) + b"," if cache_salt else b""
        if wants_usage:
            spliced += b'"stream_options":{"include_usage":true},'
        if not spliced:
            return body
        start = body.index(b"{") + 1
        return body[:start] + spliced + body[start:]
    data = msgspec.json.decode(body)
    if cache_salt:
        data["cache_salt"] = cache_salt
    if wants_usage:
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    if max_tokens is not None:
        data["max_tokens"] = max_tokens
        if "max_completion_tokens" in data:
            data["max_completion_tokens"] = max_tokens
    if texts is not None:
        _put_texts(data, summary.kind, iter(texts))
    for param, url in (image_urls or {}).items():
        message, part = map(int, _PART_PATH.fullmatch(param).groups())  # type: ignore[union-attr]
        data["messages"][message]["content"][part]["image_url"]["url"] = url
    data.pop("return_reasoning", None)
    thinking = data.pop("enable_thinking", None)
    if thinking is not None:
        data["chat_template_kwargs"] = {**(data.get("chat_template_kwargs") or {}), "enable_thinking": thinking}
    return msgspec.json.encode(data)


@functools.lru_cache(maxsize=4096)
def prefix_cache_salt(scope: str, team: str, key_id: str) -> str | None:
    """The engine's `cache_salt` for a caller: calls with the same salt may
    reuse each other's cached prompt prefixes, and only they. None: "shared".
    Hex, as vLLM takes no `/`, `@` or `\\` in a salt."""
    if scope == "shared":
        return None
    who = f"team:{team}" if scope == "team" else f"key:{key_id}"
    return hashlib.sha256(b"bastion-prefix-cache:" + who.encode()).hexdigest()[:32]


def _put_texts(data: dict[str, Any], kind: Kind, texts: Iterator[str]) -> None:
    """Write `texts` back in the walk order `summarize` read them in."""
    if kind == "completions":
        if isinstance(data["prompt"], str):
            data["prompt"] = next(texts)
        else:
            data["prompt"] = [next(texts) if isinstance(p, str) else p for p in data["prompt"]]
        return
    for message in data["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = next(texts)
        elif content:
            for part in content:
                if part.get("type") == "text":
                    part["text"] = next(texts)

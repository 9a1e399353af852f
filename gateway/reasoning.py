"""Keeping a model's reasoning from callers who did not ask for it.

vLLM's reasoning parser puts the model's thinking in `reasoning` (older
versions: `reasoning_content`) beside the answer, in a whole message and in
each streamed delta. Bastion sends it on only when the caller asked
(`return_reasoning: true`) and its policy allows reasoning; otherwise the
fields are removed. Only a body that carries reasoning text is re-encoded.

A choice that carried reasoning also loses its `logprobs` and `token_ids`
(vLLM's `logprobs: true` and `return_token_ids: true`): they list every token
generated, the thinking's too, and the reasoning could be read back from them.
In a stream that is the chunks of the thinking; in a whole answer, the choice.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

_HAS_REASONING = re.compile(rb'"reasoning(?:_content)?"\s*:\s*"')
_FIELDS = ("reasoning", "reasoning_content")
# A choice's detail of each generated token: the reasoning's tokens among them.
_TOKEN_DETAIL = ("logprobs", "token_ids")


def without_reasoning(body: bytes) -> bytes:
    """A chat completion (or one stream chunk's JSON) with its reasoning fields removed.

    ValueError if it is not JSON of that shape (the engine is untrusted input too).
    """
    if _HAS_REASONING.search(body) is None:
        return body
    try:
        data: Any = msgspec.json.decode(body)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise ValueError("not a chat completion: no list of choices")
    for choice in choices:
        if not isinstance(choice, dict):
            raise ValueError("not a chat completion: a choice is not an object")
        removed = False
        for part in ("message", "delta"):
            holder = choice.get(part)
            if isinstance(holder, dict):
                for name in _FIELDS:
                    removed |= holder.pop(name, None) is not None
        if removed:
            for name in _TOKEN_DETAIL:
                if name in choice:
                    choice[name] = None  # as vLLM sends it when not asked for
    return msgspec.json.encode(data)


def event_without_reasoning(event: bytes) -> bytes:
    """The same for one server-sent event (`data: {...}` and its blank line)."""
    if not event.startswith(b"data: {") or _HAS_REASONING.search(event) is None:
        return event
    return b"data: " + without_reasoning(event[6:].rstrip(b"\n")) + b"\n\n"

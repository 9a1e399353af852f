"""The policy document's schema: what a reviewer may write, field by field.

Every struct forbids unknown fields, so a misspelt restriction (`max_token:`)
is an error rather than a rule that silently does nothing. Numbers carry their
bounds. A team's fields default to the narrow choice: no models, text only,
no reasoning. A key's override fields default to None, meaning "as the team".
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
InputKind = Literal["text", "image", "audio"]
Action = Literal["deny", "redact", "flag"]
Capture = Literal["none", "hash", "encrypted"]
OverCap = Literal["clamp", "refuse"]


class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class MediaLimits(Strict):
    max_count: Positive | None = None
    # Decoded bytes of one part (a data: URL's payload, base64 removed).
    max_bytes: Positive | None = None
    # Audio only: length of one clip.
    max_seconds: PositiveFloat | None = None
    # Images only: width x height (x frames) of one image.
    max_pixels: Positive | None = None


class Rate(Strict):
    requests_per_minute: Positive | None = None
    tokens_per_minute: Positive | None = None
    concurrent: Positive | None = None


class Limits(Strict):
    # per_key: each key of the team on its own; per_team: all its keys together.
    per_key: Rate = msgspec.field(default_factory=Rate)
    per_team: Rate = msgspec.field(default_factory=Rate)


class ContentRule(Strict):
    # A built-in detector (email, phone, card, iban, ssn) or one from `detectors`.
    detector: str
    action: Action


class Detector(Strict):
    # RE2 syntax: matching time is linear in the text, whatever the pattern.
    pattern: str
    ignore_case: bool = False


class KeyRules(Strict):
    """A key's own rules. They can only narrow its team's: both must allow."""

    models: list[str] | None = None
    inputs: list[InputKind] | None = None
    stream: bool | None = None
    reasoning: bool | None = None
    max_tokens: Positive | None = None
    over_max_tokens: OverCap | None = None
    max_input_chars: Positive | None = None
    max_input_bytes: Positive | None = None
    images: MediaLimits | None = None
    audio: MediaLimits | None = None
    clients: list[str] | None = None
    capture: Capture | None = None
    rate: Rate | None = None
    content: list[ContentRule] | None = None


class TeamRules(Strict):
    # Names or globs (`glm-*`) of the deployments the team may call.
    models: list[str] = msgspec.field(default_factory=list)
    inputs: list[InputKind] = msgspec.field(default_factory=lambda: ["text"])
    stream: bool = True
    # `enable_thinking` (the model's reasoning mode).
    reasoning: bool = False
    # Cap on the tokens a call may generate; over it: clamp to the cap, or refuse.
    max_tokens: Positive | None = None
    over_max_tokens: OverCap = "clamp"
    # Text of all messages together.
    max_input_chars: Positive | None = None
    max_input_bytes: Positive | None = None
    images: MediaLimits = msgspec.field(default_factory=MediaLimits)
    audio: MediaLimits = msgspec.field(default_factory=MediaLimits)
    # Client addresses (CIDRs) the team's keys may call from; empty = any.
    clients: list[str] = msgspec.field(default_factory=list)
    # Payload capture for the audit trail; unset = the gateway's `audit.capture`.
    capture: Capture | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    content: list[ContentRule] = msgspec.field(default_factory=list)
    # Per-key overrides, by key id (the `bst_<key id>_...` part).
    keys: dict[str, object] = msgspec.field(default_factory=dict)


class Document(Strict):
    version: Literal[1]
    detectors: dict[str, object] = msgspec.field(default_factory=dict)
    teams: dict[str, object] = msgspec.field(default_factory=dict)

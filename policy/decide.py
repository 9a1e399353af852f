"""`decide()`: may this caller make this call, and on what terms?

A pure function of the policy, the caller and the facts of the request (no
HTTP, no SQL, no clock): the same inputs always give the same decision, which
is what the property tests lean on. Rate limits are the one stateful part;
`decide()` only says which buckets a call must take (`Decision.buckets`) and
`policy.limits` takes them.

Checks run in a fixed order and the first that fails decides. Content rules
run last, so redaction work is spent only on calls that are otherwise allowed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from policy.content import Hit, redact, scan
from policy.load import Policy
from policy.rules import Limit, Media, Rates, Rule, Rules

DEFAULT_DENY = Rule("default-deny")


class Denial(enum.Enum):
    """What kind of refusal: the gateway maps each to an HTTP status."""

    MODEL = "model"  # the model is not the caller's to use (answered like an unknown model)
    FORBIDDEN = "forbidden"  # who or where the caller is, or what kind of call
    TOO_LARGE = "too_large"  # an input over a size or count limit
    INVALID = "invalid"  # a parameter over a cap the policy refuses rather than clamps
    CONTENT = "content"  # a content rule with action deny


class MediaPart(msgspec.Struct, frozen=True):
    kind: Literal["image", "audio"]
    # Decoded size; None when it cannot be known (a remote URL).
    size: int | None = None
    # Audio length; None when it cannot be read from the data.
    seconds: float | None = None
    # Image pixels (all frames); None when unknown.
    pixels: int | None = None
    # What the gateway found when it decoded the part (for the audit record).
    mime: str | None = None
    sha256: str | None = None


class Caller(msgspec.Struct, frozen=True):
    key_id: str
    team: str
    client_addr: str | None = None


class Prompt(msgspec.Struct, frozen=True):
    """The facts of one request that policy reads (built from the gateway's summary)."""

    model: str
    stream: bool = False
    max_tokens: int | None = None
    # Completions generated, each up to max_tokens (`n`, times a batch's prompts).
    choices: int = 1
    reasoning: bool = False
    # Every text part of every message, in order (completions: the prompt strings).
    texts: tuple[str, ...] = ()
    # The prompt is token ids, which content rules cannot read.
    token_ids: bool = False
    # JSON paths of other fields whose text reaches the prompt unread by content
    # rules (tools, tool calls, chat template arguments).
    unread: tuple[str, ...] = ()
    media: tuple[MediaPart, ...] = ()


class Bucket(msgspec.Struct, frozen=True):
    """One rate limit a call draws on: `rpm:key:<id>`, `tpm:team:<name>`, `conc:...`."""

    name: str
    kind: Literal["requests", "tokens", "concurrent"]
    limit: int
    cost: int
    rule: Rule


class Fired(msgspec.Struct, frozen=True):
    """A content rule that matched: which, how often, and what was done. Never the text."""

    rule: str
    detector: str
    action: str
    count: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: Rule
    denial: Denial | None = None
    reason: str = ""
    param: str | None = None
    # The max_tokens to forward (None: leave the request's as it is).
    max_tokens: int | None = None
    clamped_from: int | None = None
    # The request's texts after redaction, in the order of Prompt.texts; None: unchanged.
    texts: tuple[str, ...] | None = None
    fired: tuple[Fired, ...] = ()
    # Whether the caller's rules allow reasoning (its text is returned only then).
    reasoning: bool = False
    buckets: tuple[Bucket, ...] = field(default=())

    def audit(self) -> dict[str, Any]:
        """What the audit trail keeps of this decision."""
        out: dict[str, Any] = {"decision": "allow" if self.allowed else "deny", "rule": self.rule.path}
        if self.rule.line is not None:
            out["line"] = self.rule.line
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.clamped_from is not None:
            out["max_tokens_clamped_from"] = self.clamped_from
        if self.fired:
            out["content"] = [msgspec.structs.asdict(f) for f in self.fired]
        if self.buckets:
            out["limits"] = {b.name: b.limit for b in self.buckets}
        return out


def _deny(rule: Rule, denial: Denial, reason: str, param: str | None = None) -> Decision:
    return Decision(False, rule, denial, reason, param)


def decide(policy: Policy, caller: Caller, prompt: Prompt) -> Decision:
    rules = policy.rules_for(caller.team, caller.key_id)
    if rules is None:
        return _deny(DEFAULT_DENY, Denial.FORBIDDEN, f"No policy allows the team '{caller.team}' to call models.")
    for clients in rules.clients:
        if not clients.allows(caller.client_addr):
            return _deny(
                clients.rule, Denial.FORBIDDEN, f"Calls from {caller.client_addr} are not allowed for this key."
            )
    for models in rules.models:
        if not models.allows(prompt.model):
            return _deny(
                models.rule,
                Denial.MODEL,
                f"The model '{prompt.model}' does not exist or you do not have access to it.",
                "model",
            )
    denied = _check_kinds(rules, prompt) or _check_sizes(rules, prompt)
    if denied:
        return denied
    max_tokens, clamped_from = prompt.max_tokens, None
    cap = rules.max_tokens
    if cap is not None:
        if max_tokens is None:
            max_tokens = int(cap.value)  # no request goes out without a bound
        elif max_tokens > cap.value:
            if rules.over_max_tokens == "refuse":
                return _deny(
                    rules.over_max_tokens_rule,
                    Denial.INVALID,
                    f"max_tokens {max_tokens} is over this key's limit of {cap.value}.",
                    "max_tokens",
                )
            max_tokens, clamped_from = int(cap.value), max_tokens
    texts, fired = prompt.texts, ()
    if rules.content:
        if prompt.token_ids:
            return _deny(
                rules.content[0].rule,
                Denial.CONTENT,
                "Prompts given as token ids cannot be checked by this key's content rules; send text.",
                "prompt",
            )
        if prompt.unread:
            return _deny(
                rules.content[0].rule,
                Denial.CONTENT,
                f"This key's content rules cannot check '{prompt.unread[0]}': they read only message content.",
                prompt.unread[0],
            )
        outcome = _check_content(rules, prompt.texts)
        if isinstance(outcome, Decision):
            return outcome
        texts, fired = outcome
    return Decision(
        True,
        rules.origin,
        max_tokens=max_tokens if max_tokens != prompt.max_tokens else None,
        clamped_from=clamped_from,
        texts=texts if texts is not prompt.texts else None,
        fired=fired,
        reasoning=rules.reasoning,
        buckets=_buckets(rules, caller, prompt, max_tokens),
    )


def _check_kinds(rules: Rules, prompt: Prompt) -> Decision | None:
    kinds = {m.kind for m in prompt.media}
    if prompt.texts or prompt.token_ids:
        kinds.add("text")
    for kind in sorted(kinds - rules.inputs):
        return _deny(rules.inputs_rule, Denial.FORBIDDEN, f"{kind.capitalize()} input is not allowed for this key.")
    if prompt.stream and not rules.stream:
        return _deny(rules.stream_rule, Denial.FORBIDDEN, "Streaming is not allowed for this key.", "stream")
    if prompt.reasoning and not rules.reasoning:
        return _deny(
            rules.reasoning_rule,
            Denial.FORBIDDEN,
            'Reasoning (enable_thinking, or a reasoning_effort other than "none") is not allowed for this key.',
            "enable_thinking",
        )
    return None


def _over(limit: Limit | None, value: float) -> bool:
    return limit is not None and value > limit.value


def _check_sizes(rules: Rules, prompt: Prompt) -> Decision | None:
    if rules.max_input_chars or rules.max_input_bytes:
        chars = sum(len(t) for t in prompt.texts)
        if _over(rules.max_input_chars, chars):
            lim = rules.max_input_chars
            assert lim is not None
            return _deny(lim.rule, Denial.TOO_LARGE, f"The input is {chars} characters; the limit is {lim.value}.")
        if rules.max_input_bytes is not None:
            size = sum(len(t.encode()) for t in prompt.texts)
            lim = rules.max_input_bytes
            if size > lim.value:
                return _deny(lim.rule, Denial.TOO_LARGE, f"The input text is {size} bytes; the limit is {lim.value}.")
    for kind, limits in (("image", rules.images), ("audio", rules.audio)):
        denied = _check_media(kind, limits, [m for m in prompt.media if m.kind == kind])
        if denied:
            return denied
    return None


def _check_media(kind: str, limits: Media, parts: list[MediaPart]) -> Decision | None:
    if not parts:
        return None
    if limits.max_count is not None and len(parts) > limits.max_count.value:
        return _deny(
            limits.max_count.rule,
            Denial.TOO_LARGE,
            f"{len(parts)} {kind} parts; the limit is {limits.max_count.value}.",
        )
    for part in parts:
        if limits.max_bytes is not None:
            if part.size is None:
                return _deny(
                    limits.max_bytes.rule,
                    Denial.TOO_LARGE,
                    f"The size of an {kind} given by URL cannot be checked; send it inline as data.",
                )
            if part.size > limits.max_bytes.value:
                return _deny(
                    limits.max_bytes.rule,
                    Denial.TOO_LARGE,
                    f"An {kind} part is {part.size} bytes; the limit is {limits.max_bytes.value}.",
                )
        if limits.max_pixels is not None and (part.pixels is None or part.pixels > limits.max_pixels.value):
            return _deny(
                limits.max_pixels.rule,
                Denial.TOO_LARGE,
                f"An {kind} part has {part.pixels or 'an unknown number of'} pixels; the limit is "
                f"{limits.max_pixels.value}.",
            )
        if limits.max_seconds is not None:
            if part.seconds is None:
                return _deny(
                    limits.max_seconds.rule,
                    Denial.TOO_LARGE,
                    f"The length of an {kind} part cannot be read (send WAV) and this key has a limit on it.",
                )
            if part.seconds > limits.max_seconds.value:
                return _deny(
                    limits.max_seconds.rule,
                    Denial.TOO_LARGE,
                    f"An {kind} part is {part.seconds:.1f} s long; the limit is {limits.max_seconds.value} s.",
                )
    return None


def _check_content(rules: Rules, texts: tuple[str, ...]) -> Decision | tuple[tuple[str, ...], tuple[Fired, ...]]:
    detectors = [c.detector for c in rules.content]
    by_detector = {c.detector.name: c for c in rules.content}
    counts: dict[str, int] = {}
    out = list(texts)
    for i, text in enumerate(texts):
        hits = scan(text, detectors)
        if not hits:
            continue
        to_redact: list[Hit] = []
        for hit in hits:
            check = by_detector[hit.detector]
            if check.action == "deny":
                return _deny(
                    check.rule, Denial.CONTENT, f"The input contains data this key may not send ({hit.detector})."
                )
            counts[hit.detector] = counts.get(hit.detector, 0) + 1
            if check.action == "redact":
                to_redact.append(hit)
        if to_redact:
            out[i] = redact(text, to_redact)
    fired = tuple(Fired(by_detector[d].rule.path, d, by_detector[d].action, n) for d, n in counts.items())
    return (tuple(out) if out != list(texts) else texts), fired


def _buckets(rules: Rules, caller: Caller, prompt: Prompt, max_tokens: int | None) -> tuple[Bucket, ...]:
    # A call reserves what it may use: max_tokens for each of its choices, plus
    # an estimate of its prompt (4 characters a token); the engine's usage
    # settles it afterwards.
    tokens = (max_tokens or 0) * prompt.choices + sum(len(t) for t in prompt.texts) // 4 + 1
    out: list[Bucket] = []
    for scope, ident, rates in (("key", caller.key_id, rules.per_key), ("team", caller.team, rules.per_team)):
        out += _scope_buckets(scope, ident, rates, tokens)
    return tuple(out)


def _scope_buckets(scope: str, ident: str, rates: Rates, tokens: int) -> list[Bucket]:
    out = []
    for kind, short, limit, cost in (
        ("requests", "rpm", rates.requests_per_minute, 1),
        ("tokens", "tpm", rates.tokens_per_minute, tokens),
        ("concurrent", "conc", rates.concurrent, 1),
    ):
        if limit is not None:
            out.append(Bucket(f"{short}:{scope}:{ident}", kind, int(limit.value), cost, limit.rule))  # type: ignore[arg-type]
    return out

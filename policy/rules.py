"""A policy compiled for deciding: one `Rules` per team and per overridden key.

A key's rules are its team's narrowed by its own override: lists must allow
in both, caps and limits take the smaller, booleans must both be true, content
rules add up (the stricter action wins for a detector named twice). So the
team block is the upper bound a reviewer reads for every key of the team.
Each restriction remembers where it was written (`Rule`), which is what a
decision reports and the audit trail records.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import msgspec

from policy.content import Detector
from policy.schema import Capture, InputKind, KeyRules, MediaLimits, OverCap, Rate, TeamRules

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The line of a dotted field path (`teams.risk.max_tokens`): `Source.line_of`.
LineOf = Callable[[str], int | None]
_STRICTNESS = {"flag": 0, "redact": 1, "deny": 2}


class Rule(msgspec.Struct, frozen=True):
    """Where a restriction is written: `teams.risk.keys.k1.max_tokens`, line 14."""

    path: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class ModelList:
    rule: Rule
    regex: re.Pattern[str]

    @classmethod
    def of(cls, patterns: list[str], rule: Rule) -> ModelList:
        # fnmatch globs (`glm-*`) joined into one anchored regex.
        joined = "|".join(fnmatch.translate(p) for p in patterns) or r"(?!)"
        return cls(rule, re.compile(joined))

    def allows(self, model: str) -> bool:
        return self.regex.match(model) is not None


@dataclass(frozen=True, slots=True)
class ClientList:
    rule: Rule
    networks: tuple[Network, ...]

    def allows(self, addr: str | None) -> bool:
        ip = None if addr is None else _address(addr)
        return ip is not None and any(ip in n for n in self.networks)


@functools.lru_cache(maxsize=4096)
def _address(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address parsed once: callers come back from the same few
    addresses, and parsing one costs more than the rest of the check."""
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Limit:
    """One number from the policy, and where it is written."""

    value: int | float
    rule: Rule


@dataclass(frozen=True, slots=True)
class ContentCheck:
    detector: Detector
    action: str
    rule: Rule


@dataclass(frozen=True, slots=True)
class Rates:
    requests_per_minute: Limit | None = None
    tokens_per_minute: Limit | None = None
    concurrent: Limit | None = None


@dataclass(frozen=True, slots=True)
class Media:
    max_count: Limit | None = None
    max_bytes: Limit | None = None
    max_seconds: Limit | None = None
    max_pixels: Limit | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    team: str
    origin: Rule
    models: tuple[ModelList, ...]
    inputs: frozenset[InputKind]
    inputs_rule: Rule
    stream: bool
    stream_rule: Rule
    reasoning: bool
    reasoning_rule: Rule
    max_tokens: Limit | None
    over_max_tokens: OverCap
    over_max_tokens_rule: Rule
    max_input_chars: Limit | None
    max_input_bytes: Limit | None
    images: Media
    audio: Media
    clients: tuple[ClientList, ...]
    capture: Capture | None
    per_key: Rates
    per_team: Rates
    content: tuple[ContentCheck, ...] = field(default=())


def _limit(value: int | float | None, rule: Rule) -> Limit | None:
    return None if value is None else Limit(value, rule)


def _tighter(a: Limit | None, b: Limit | None) -> Limit | None:
    if a is None or b is None:
        return a or b
    return b if b.value < a.value else a


LimitSet = TypeVar("LimitSet", Media, Rates)


def _limits(into: type[LimitSet], spec: MediaLimits | Rate, path: str, line_of: LineOf) -> LimitSet:
    """A group of numbers from the policy (media or rate limits), each with where it is written."""
    names = [f.name for f in fields(into)]
    return into(*(_limit(getattr(spec, n), Rule(f"{path}.{n}", line_of(f"{path}.{n}"))) for n in names))


def _narrow(a: LimitSet, b: LimitSet) -> LimitSet:
    """Each limit of the group, the tighter of two."""
    return type(a)(*(_tighter(getattr(a, f.name), getattr(b, f.name)) for f in fields(a)))


def _networks(cidrs: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _content(rules: list[ContentCheck]) -> tuple[ContentCheck, ...]:
    """One check per detector: the strictest action wins."""
    by_detector: dict[str, ContentCheck] = {}
    for check in rules:
        seen = by_detector.get(check.detector.name)
        if seen is None or _STRICTNESS[check.action] > _STRICTNESS[seen.action]:
            by_detector[check.detector.name] = check
    return tuple(by_detector.values())


def team_rules(team: str, spec: TeamRules, detectors: dict[str, Detector], line_of: LineOf) -> Rules:
    base = f"teams.{team}"

    def rule(name: str) -> Rule:
        return Rule(f"{base}.{name}", line_of(f"{base}.{name}"))

    checks = [ContentCheck(detectors[c.detector], c.action, rule(f"content[{i}]")) for i, c in enumerate(spec.content)]
    return Rules(
        team=team,
        origin=Rule(base, line_of(base)),
        models=(ModelList.of(spec.models, rule("models")),),
        inputs=frozenset(spec.inputs),
        inputs_rule=rule("inputs"),
        stream=spec.stream,
        stream_rule=rule("stream"),
        reasoning=spec.reasoning,
        reasoning_rule=rule("reasoning"),
        max_tokens=_limit(spec.max_tokens, rule("max_tokens")),
        over_max_tokens=spec.over_max_tokens,
        over_max_tokens_rule=rule("over_max_tokens"),
        max_input_chars=_limit(spec.max_input_chars, rule("max_input_chars")),
        max_input_bytes=_limit(spec.max_input_bytes, rule("max_input_bytes")),
        images=_limits(Media, spec.images, f"{base}.images", line_of),
        audio=_limits(Media, spec.audio, f"{base}.audio", line_of),
        clients=(ClientList(rule("clients"), _networks(spec.clients)),) if spec.clients else (),
        capture=spec.capture,
        per_key=_limits(Rates, spec.limits.per_key, f"{base}.limits.per_key", line_of),
        per_team=_limits(Rates, spec.limits.per_team, f"{base}.limits.per_team", line_of),
        content=_content(checks),
    )


def key_rules(team: Rules, key_id: str, spec: KeyRules, detectors: dict[str, Detector], line_of: LineOf) -> Rules:
    """The team's rules narrowed by one key's override."""
    base = f"{team.origin.path}.keys.{key_id}"

    def rule(name: str) -> Rule:
        return Rule(f"{base}.{name}", line_of(f"{base}.{name}"))

    r = replace(team, origin=Rule(base, line_of(base)))
    if spec.models is not None:
        r = replace(r, models=(*r.models, ModelList.of(spec.models, rule("models"))))
    if spec.inputs is not None:
        r = replace(r, inputs=r.inputs & frozenset(spec.inputs), inputs_rule=rule("inputs"))
    if spec.stream is False:
        r = replace(r, stream=False, stream_rule=rule("stream"))
    if spec.reasoning is False:
        r = replace(r, reasoning=False, reasoning_rule=rule("reasoning"))
    if spec.over_max_tokens == "refuse":
        r = replace(r, over_max_tokens="refuse", over_max_tokens_rule=rule("over_max_tokens"))
    r = replace(
        r,
        max_tokens=_tighter(r.max_tokens, _limit(spec.max_tokens, rule("max_tokens"))),
        max_input_chars=_tighter(r.max_input_chars, _limit(spec.max_input_chars, rule("max_input_chars"))),
        max_input_bytes=_tighter(r.max_input_bytes, _limit(spec.max_input_bytes, rule("max_input_bytes"))),
    )
    if spec.images is not None:
        r = replace(r, images=_narrow(r.images, _limits(Media, spec.images, f"{base}.images", line_of)))
    if spec.audio is not None:
        r = replace(r, audio=_narrow(r.audio, _limits(Media, spec.audio, f"{base}.audio", line_of)))
    if spec.clients is not None:
        r = replace(r, clients=(*r.clients, ClientList(rule("clients"), _networks(spec.clients))))
    if spec.capture is not None:
        r = replace(r, capture=spec.capture)
    if spec.rate is not None:
        r = replace(r, per_key=_narrow(r.per_key, _limits(Rates, spec.rate, f"{base}.rate", line_of)))
    if spec.content:
        checks = [
            ContentCheck(detectors[c.detector], c.action, rule(f"content[{i}]")) for i, c in enumerate(spec.content)
        ]
        r = replace(r, content=_content([*r.content, *checks]))
    return r

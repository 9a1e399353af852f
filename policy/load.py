"""Load a policy file: YAML → schema-checked structs → compiled `Policy`.

Each part (the document, each detector, each team, each key override) is
validated on its own so that an error names the exact field and its line
(msgspec writes dictionary keys as `[...]` in its paths; converting part by
part lets us put the real names back).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, TypeVar

import msgspec

from policy.content import BUILTINS, Detector, PatternError, builtin
from policy.errors import PolicyError
from policy.rules import Rules, key_rules, team_rules
from policy.schema import Detector as DetectorSpec
from policy.schema import Document, KeyRules, TeamRules
from policy.source import Path, Source, read_yaml

T = TypeVar("T")
# Policy files are small; a huge one is a mistake or an attack on the parser.
MAX_POLICY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Policy:
    """A loaded policy: the rules of every team and every overridden key."""

    source: str
    sha256: str
    teams: dict[str, Rules]
    keys: dict[tuple[str, str], Rules] = field(default_factory=dict)

    def rules_for(self, team: str, key_id: str) -> Rules | None:
        """The caller's rules, or None: a team without a policy may call nothing."""
        return self.keys.get((team, key_id)) or self.teams.get(team)

    def capture_for(self, team: str, key_id: str) -> str | None:
        """The payload capture mode the policy sets for a caller (None: the gateway's default)."""
        rules = self.rules_for(team, key_id)
        return rules.capture if rules else None

    @property
    def uses_encrypted_capture(self) -> bool:
        return any(r.capture == "encrypted" for r in (*self.teams.values(), *self.keys.values()))


def load_policy(path: FilePath) -> Policy:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        raise PolicyError(str(path), "the policy file does not exist") from None
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read the policy file: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(str(path), f"the policy file is larger than {MAX_POLICY_BYTES} bytes")
    return parse_policy(raw, str(path))


def parse_policy(raw: bytes, name: str) -> Policy:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(name, f"not UTF-8 text (byte {exc.start})") from None
    src = read_yaml(text, name)
    if not isinstance(src.data, dict):
        raise PolicyError(name, "the policy must be a mapping with `version` and `teams`", line=1)
    doc = _convert(src, src.data, Document, ())
    detectors = _detectors(src, doc.detectors)
    teams: dict[str, Rules] = {}
    keys: dict[tuple[str, str], Rules] = {}
    for team, team_data in doc.teams.items():
        spec = _convert(src, team_data, TeamRules, ("teams", team))
        _check_team(src, ("teams", team), spec, detectors)
        teams[team] = team_rules(team, spec, detectors, src.line_of)
        for key_id, key_data in spec.keys.items():
            where: Path = ("teams", team, "keys", key_id)
            override = _convert(src, key_data, KeyRules, where)
            _check_key(src, where, override, detectors, teams[team])
            keys[(team, key_id)] = key_rules(teams[team], key_id, override, detectors, src.line_of)
    return Policy(source=name, sha256=hashlib.sha256(raw).hexdigest(), teams=teams, keys=keys)


def _convert(src: Source, data: Any, into: type[T], at: Path) -> T:
    try:
        return msgspec.convert(data, into, strict=True)
    except msgspec.ValidationError as exc:
        raise _located(src, str(exc), at) from None


def _located(src: Source, message: str, at: Path) -> PolicyError:
    """Turn msgspec's `... - at `$.limits.per_key.concurrent`` into a field path with a line."""
    text, _, where = message.rpartition(" - at `$")
    if not text:
        text, where = message, ""
    path: list[str | int] = list(at)
    for part in where.rstrip("`").replace("[", ".[").split("."):
        if part.startswith("[") and part[1:-1].isdigit():
            path.append(int(part[1:-1]))
        elif part:
            path.append(part)
    unknown = text.removeprefix("Object contains unknown field `")
    if unknown != text:
        field_name = unknown.rstrip("`")
        path.append(field_name)
        text = f"unknown field {field_name!r} (a misspelt restriction would silently do nothing)"
    # "int | null" reads as a puzzle to a policy author; leaving a field out is how to unset it.
    return src.error(tuple(path), text.replace("`", "").replace(" | null", ""))


def _detectors(src: Source, specs: dict[str, Any]) -> dict[str, Detector]:
    found = {name: d for name in BUILTINS if (d := builtin(name)) is not None}
    for name, data in specs.items():
        at: Path = ("detectors", name)
        if name in BUILTINS:
            raise src.error(at, f"{name!r} is a built-in detector; give a custom one another name")
        spec = _convert(src, data, DetectorSpec, at)
        try:
            found[name] = Detector.compile(name, spec.pattern, ignore_case=spec.ignore_case)
        except PatternError as exc:
            raise src.error((*at, "pattern"), f"not a valid RE2 pattern: {exc}") from None
        if found[name].regex.search("") is not None:
            raise src.error((*at, "pattern"), "the pattern matches empty text, so it would fire everywhere")
    return found


def _check_content(src: Source, at: Path, rules: list[Any], detectors: dict[str, Detector]) -> None:
    for i, rule in enumerate(rules):
        if rule.detector not in detectors:
            known = ", ".join(sorted(detectors))
            raise src.error((*at, "content", i, "detector"), f"unknown detector {rule.detector!r} (known: {known})")


def _check_clients(src: Source, at: Path, cidrs: list[str]) -> None:
    for i, cidr in enumerate(cidrs):
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise src.error((*at, "clients", i), f"not a network in CIDR form: {exc}") from None


def _check_team(src: Source, at: Path, spec: TeamRules, detectors: dict[str, Detector]) -> None:
    _check_content(src, at, spec.content, detectors)
    _check_clients(src, at, spec.clients)
    for scope in ("per_key", "per_team"):
        tpm = getattr(spec.limits, scope).tokens_per_minute
        if tpm is not None and spec.max_tokens is None:
            # Every call reserves its max_tokens before it runs; without a cap
            # the reservation would be unbounded.
            raise src.error((*at, "limits", scope, "tokens_per_minute"), "a tokens_per_minute limit needs max_tokens")
        if tpm is not None and spec.max_tokens is not None and spec.max_tokens > tpm:
            raise src.error((*at, "max_tokens"), f"max_tokens is larger than limits.{scope}.tokens_per_minute ({tpm})")


def _check_key(src: Source, at: Path, spec: KeyRules, detectors: dict[str, Detector], team: Rules) -> None:
    _check_content(src, at, spec.content or [], detectors)
    _check_clients(src, at, spec.clients or [])
    if spec.stream is True and not team.stream or spec.reasoning is True and not team.reasoning:
        raise src.error(at, "a key can narrow its team's rules, not widen them (stream/reasoning)")
    if spec.rate and spec.rate.tokens_per_minute is not None and spec.max_tokens is None and team.max_tokens is None:
        raise src.error((*at, "rate", "tokens_per_minute"), "a tokens_per_minute limit needs max_tokens")

"""Policy as plain functions: loading and its errors, detectors, decide(), and
properties that hold for every policy (hypothesis)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Caller, Denial, MediaPart, PolicyError, Prompt, decide, load_policy, parse_policy
from policy.content import BUILTINS, builtin, fold, iban_valid, luhn_valid, redact, scan

POLICY = """\
version: 1
detectors:
  employee_id:
    pattern: 'EMP-[0-9]{6}'
teams:
  risk:
    models: [tiny, "glm-*"]
    inputs: [text, image]
    max_tokens: 64
    max_input_chars: 1000
    images: {max_count: 2, max_bytes: 1000}
    clients: [127.0.0.0/8, "::1/128"]
    limits:
      per_key: {requests_per_minute: 10, tokens_per_minute: 1000}
      per_team: {concurrent: 4}
    content:
      - {detector: email, action: redact}
      - {detector: card, action: deny}
      - {detector: employee_id, action: flag}
    keys:
      k1:
        models: [tiny]
        max_tokens: 16
        over_max_tokens: refuse
        rate: {requests_per_minute: 2}
  ops:
    models: ["*"]
    inputs: [text, audio]
    stream: false
    audio: {max_seconds: 1.5}
"""

RISK = Caller("k9", "risk", "127.0.0.1")


def policy(text: str = POLICY):  # type: ignore[no-untyped-def]
    return parse_policy(text.encode(), "policy.yaml")


# ------------------------------------------------------------------ loading


BAD = [
    ("", 0, None, "empty"),
    ("version: 1\nteams: [\n", 3, None, "not valid YAML"),
    ("- just\n- a list\n", 1, None, "must be a mapping"),
    ("version: 2\nteams: {}\n", 1, "version", "Invalid enum value 2"),
    ("teams: {}\n", None, None, "missing required field"),
    ("version: 1\nteamz: {}\n", 2, "teamz", "unknown field 'teamz'"),
    ("version: 1\nteams:\n  a:\n    models: [x]\n    max_token: 5\n", 5, "teams.a.max_token", "unknown field"),
    ("version: 1\nteams:\n  a:\n    max_tokens: many\n", 4, "teams.a.max_tokens", "Expected int, got str"),
    ("version: 1\nteams:\n  a:\n    max_tokens: 0\n", 4, "teams.a.max_tokens", "Expected int >= 1"),
    ("version: 1\nteams:\n  a:\n    stream: maybe\n", 4, "teams.a.stream", "Expected bool"),
    ("version: 1\nteams:\n  a:\n    inputs: [text, video]\n", 4, "teams.a.inputs[1]", "Invalid enum value 'video'"),
    ("version: 1\nteams:\n  a:\n    over_max_tokens: trim\n", 4, "teams.a.over_max_tokens", "Invalid enum"),
    (
        "version: 1\nteams:\n  a:\n    limits:\n      per_key:\n        concurrent: -1\n",
        6,
        "teams.a.limits.per_key.concurrent",
        ">= 1",
    ),
    ("version: 1\nteams:\n  a: {}\n  a: {}\n", 4, "teams.a", "given twice"),
    ("version: 1\nteams:\n  a: &x {models: [m]}\n  b: *x\n", 3, None, "anchors and aliases"),
    (
        "version: 1\nteams:\n  a:\n    content:\n      - {detector: nope, action: deny}\n",
        5,
        "teams.a.content[0].detector",
        "unknown detector 'nope'",
    ),
    (
        "version: 1\nteams:\n  a:\n    content:\n      - {detector: email, action: block}\n",
        5,
        "teams.a.content[0].action",
        "Invalid enum value 'block'",
    ),
    ("version: 1\ndetectors:\n  d:\n    pattern: '(?!x)y'\n", 4, "detectors.d.pattern", "not a valid RE2 pattern"),
    ("version: 1\ndetectors:\n  d:\n    pattern: 'x*'\n", 4, "detectors.d.pattern", "matches empty text"),
    ("version: 1\ndetectors:\n  email:\n    pattern: 'x'\n", 3, "detectors.email", "built-in"),
    ("version: 1\nteams:\n  a:\n    clients: [10.0.0.1/8]\n", 4, "teams.a.clients[0]", "host bits set"),
    ("version: 1\nteams:\n  a:\n    clients: [intranet]\n", 4, "teams.a.clients[0]", "CIDR"),
    (
        "version: 1\nteams:\n  a:\n    limits:\n      per_team: {tokens_per_minute: 10}\n",
        5,
        "teams.a.limits.per_team.tokens_per_minute",
        "needs max_tokens",
    ),
    (
        "version: 1\nteams:\n  a:\n    max_tokens: 100\n    limits:\n      per_key: {tokens_per_minute: 10}\n",
        4,
        "teams.a.max_tokens",
        "larger than",
    ),
    ("version: 1\nteams:\n  a:\n    keys:\n      k: {stream: true}\n    stream: false\n", 5, "teams.a.keys.k", "widen"),
    ("version: 1\nteams:\n  a:\n    keys:\n      k: {modelz: [x]}\n", 5, "teams.a.keys.k.modelz", "unknown field"),
    (
        "version: 1\nteams:\n  a:\n    images: {max_count: 1, max_megapixels: 9}\n",
        4,
        "teams.a.images.max_megapixels",
        "unknown",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "message"), BAD, ids=[b[3] for b in BAD])
def test_invalid_policies_name_file_line_and_field(
    text: str, line: int | None, field: str | None, message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text.encode(), "bad.yaml")
    err = caught.value
    assert message in str(err)
    assert err.source == "bad.yaml" and str(err).startswith("bad.yaml")
    if line:
        assert err.line == line, str(err)
    assert err.field == field, str(err)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(tmp_path / "latin1.yaml")


def test_the_policy_hash_names_the_exact_file() -> None:
    assert policy().sha256 != policy(POLICY + "\n").sha256


# ---------------------------------------------------------------- detectors


@pytest.mark.parametrize(
    ("detector", "found", "not_found"),
    [
        ("email", ["jane.doe@bank.example", "a+b@x.co.uk"], ["jane at bank", "@handle", "a@b"]),
        ("phone", ["+44 20 7946 0958", "(212) 555-0199", "212-555-0199", "+1 212 555 0199"], ["2024-01-15", "v1.2.3"]),
        ("card", ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"], ["4111 1111 1111 1112", "1234"]),
        ("iban", ["DE89370400440532013000", "GB82 WEST 1234 5698 7654 32"], ["DE89370400440532013001", "GB00 WEST"]),
        ("ssn", ["123-45-6789"], ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-6789", "123456789"]),
    ],
)
def test_builtin_detectors(detector: str, found: list[str], not_found: list[str]) -> None:
    d = builtin(detector)
    assert d is not None
    for text in found:
        hits = scan(f"see {text} here", [d])
        assert [f"see {text} here"[h.start : h.end] for h in hits] == [text], text
    for text in not_found:
        assert scan(f"see {text} here", [d]) == [], text


@pytest.mark.parametrize(
    ("detector", "text"),
    [
        ("card", "４１１１ １１１１ １１１１ １１１１"),  # full-width digits, as Japanese forms print them
        ("card", "٤١١١١١١١١١١١١١١١"),  # Arabic-Indic digits
        ("card", "4111\u200b1111\u200b1111\u200b1111"),  # zero-width spaces, as copied from a web page
        ("card", "4111\u20131111\u20131111\u20131111"),  # en dashes
        ("email", "jane＠bank．example"),
        ("ssn", "123\u00ad-45-6789"),  # a soft hyphen, as copied from a PDF
        ("iban", "DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000"),  # no-break spaces
    ],
)
def test_detectors_read_text_as_a_person_does(detector: str, text: str) -> None:
    """Written so that only a byte-for-byte pattern misses it, it is the same
    number to the model; before folding, each of these went through."""
    d = builtin(detector)
    assert d is not None
    line = f"日本語 {text} here"
    hits = scan(line, [d])
    assert [line[h.start : h.end] for h in hits] == [text]  # spans of the text as sent
    assert redact(line, hits) == f"日本語 [REDACTED:{detector}] here"


def test_folding_counts_a_match_once_and_leaves_other_text_alone() -> None:
    card = builtin("card")
    assert card is not None
    text = "4111 1111 1111 1111, ４１１１ １１１１ １１１１ １１１１ と ①②"
    assert [(h.start, h.end) for h in scan(text, [card])] == [(0, 19), (21, 40)]
    assert scan("４１１１ １１１１ １１１１ １１１２", [card]) == []  # folded, it still has to pass Luhn
    assert fold("ascii stays") == "ascii stays" and fold("ｶﾀｶﾅ ①") == "カタカナ 1"


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83 WEST 1234 5698 7654 32")


def test_redaction_replaces_each_match_with_its_type() -> None:
    text = "mail jane@bank.example, card 4111 1111 1111 1111, again jane@bank.example"
    detectors = [builtin(n) for n in BUILTINS]
    out = redact(text, scan(text, [d for d in detectors if d]))
    assert out == "mail [REDACTED:email], card [REDACTED:card], again [REDACTED:email]"


# ------------------------------------------------------------------- decide


def test_deny_by_default_for_a_team_without_policy() -> None:
    d = decide(policy(), Caller("k", "nobody", "127.0.0.1"), Prompt("tiny", texts=("hi",)))
    assert not d.allowed and d.rule.path == "default-deny" and d.denial is Denial.FORBIDDEN


def test_each_rule_allows_and_denies() -> None:
    p = policy()
    ok = decide(p, RISK, Prompt("glm-9b", texts=("hello",)))
    assert ok.allowed and ok.rule.path == "teams.risk" and ok.max_tokens == 64  # a bound is always set

    cases = [
        (Caller("k9", "risk", "10.1.2.3"), Prompt("tiny"), "teams.risk.clients"),
        (Caller("k9", "risk", None), Prompt("tiny"), "teams.risk.clients"),
        (RISK, Prompt("llama"), "teams.risk.models"),
        (RISK, Prompt("tiny", media=(MediaPart("audio", 10),)), "teams.risk.inputs"),
        (RISK, Prompt("tiny", texts=("x" * 1001,)), "teams.risk.max_input_chars"),
        (RISK, Prompt("tiny", media=(MediaPart("image", 10),) * 3), "teams.risk.images.max_count"),
        (RISK, Prompt("tiny", media=(MediaPart("image", 1001),)), "teams.risk.images.max_bytes"),
        (RISK, Prompt("tiny", media=(MediaPart("image", None),)), "teams.risk.images.max_bytes"),
        (RISK, Prompt("tiny", texts=("pay 4111 1111 1111 1111",)), "teams.risk.content[1]"),
        (RISK, Prompt("tiny", token_ids=True), "teams.risk.content[0]"),
        (RISK, Prompt("tiny", unread=("tools",)), "teams.risk.content[0]"),
        (RISK, Prompt("tiny", reasoning=True), "teams.risk.reasoning"),
        (Caller("k", "ops"), Prompt("x", stream=True), "teams.ops.stream"),
        (Caller("k", "ops"), Prompt("x", media=(MediaPart("audio", 10, 2.0),)), "teams.ops.audio.max_seconds"),
        (Caller("k", "ops"), Prompt("x", media=(MediaPart("audio", 10, None),)), "teams.ops.audio.max_seconds"),
        (Caller("k1", "risk", "::1"), Prompt("glm-9b"), "teams.risk.keys.k1.models"),
        (Caller("k1", "risk", "::1"), Prompt("tiny", max_tokens=17), "teams.risk.keys.k1.over_max_tokens"),
    ]
    for caller, prompt, rule in cases:
        d = decide(p, caller, prompt)
        assert not d.allowed and d.rule.path == rule, (prompt, d)
        assert d.rule.line is not None or rule == "default-deny"

    assert decide(p, Caller("k", "ops"), Prompt("x", media=(MediaPart("audio", 10, 1.0),))).allowed
    clamped = decide(p, RISK, Prompt("tiny", max_tokens=500))
    assert clamped.allowed and clamped.max_tokens == 64 and clamped.clamped_from == 500
    assert decide(p, RISK, Prompt("tiny", max_tokens=10)).max_tokens is None  # under the cap: untouched


def test_content_rules_redact_flag_and_never_audit_the_text() -> None:
    d = decide(policy(), RISK, Prompt("tiny", texts=("mail jane@bank.example", "id EMP-123456", "clean")))
    assert d.allowed
    assert d.texts == ("mail [REDACTED:email]", "id EMP-123456", "clean")
    assert {(f.detector, f.action, f.count) for f in d.fired} == {("email", "redact", 1), ("employee_id", "flag", 1)}
    audited = repr(d.audit())
    assert "jane@bank.example" not in audited and "EMP-123456" not in audited


def test_key_override_narrows_and_takes_its_own_limits() -> None:
    d = decide(policy(), Caller("k1", "risk", "::1"), Prompt("tiny", texts=("abcd" * 10,)))
    assert d.allowed and d.max_tokens == 16
    limits = {b.name: (b.limit, b.cost) for b in d.buckets}
    assert limits["rpm:key:k1"] == (2, 1)  # the key's own, tighter than the team's 10
    assert limits["tpm:key:k1"] == (1000, 16 + 40 // 4 + 1)  # max_tokens + prompt estimate
    assert limits["conc:team:risk"] == (4, 1)


# --------------------------------------------------------------- properties

MODELS = ["tiny", "glm-9b", "glm-4", "llama"]
TEAMS = ["a", "b", "c"]


@st.composite
def team_block(draw: st.DrawFn) -> dict[str, object]:
    """A team block, leaning permissive so that most generated calls get far
    enough for a restriction to matter."""
    block: dict[str, object] = {
        "models": draw(st.sampled_from([["*"], ["*"], ["tiny", "glm-*"], ["glm-*"], ["llama"], []])),
        "inputs": draw(
            st.sampled_from([["text", "image", "audio"], ["text", "image", "audio"], ["text"], ["text", "image"]])
        ),
        "stream": draw(st.booleans() | st.just(True)),
        "reasoning": draw(st.booleans() | st.just(True)),
        "over_max_tokens": draw(st.sampled_from(["clamp", "refuse"])),
    }
    if draw(st.booleans()):
        block["max_tokens"] = draw(st.integers(1, 200))
    if draw(st.integers(0, 3)) == 0:
        block["max_input_chars"] = draw(st.integers(1, 60))
    if draw(st.integers(0, 3)) == 0:
        block["images"] = {"max_count": draw(st.integers(1, 3))}
    if draw(st.integers(0, 3)) == 0:
        block["clients"] = [draw(st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "::1/128"]))]
    rule = st.fixed_dictionaries(
        {"detector": st.sampled_from(["email", "card", "ssn"]), "action": st.sampled_from(["deny", "redact", "flag"])}
    )
    block["content"] = draw(st.lists(rule, max_size=2)) if draw(st.booleans()) else []
    return block


def to_yaml(teams: dict[str, dict[str, object]]) -> bytes:
    import json

    # JSON is YAML: the generated policy goes through the real loader.
    return json.dumps({"version": 1, "teams": teams}).encode()


prompts = st.builds(
    Prompt,
    model=st.sampled_from(MODELS),
    stream=st.booleans(),
    max_tokens=st.none() | st.integers(1, 300),
    reasoning=st.booleans(),
    texts=st.lists(
        st.sampled_from(["hello", "mail jane@bank.example", "card 4111 1111 1111 1111", "ssn 123-45-6789", "x" * 50]),
        max_size=3,
    ).map(tuple),
    media=st.lists(st.builds(MediaPart, kind=st.sampled_from(["image", "audio"]), size=st.just(10)), max_size=3).map(
        tuple
    ),
)
callers = st.builds(
    Caller,
    key_id=st.just("k"),
    team=st.sampled_from([*TEAMS, "zz"]),
    client_addr=st.sampled_from(["127.0.0.1", "10.9.9.9", "::1"]),
)


@settings(max_examples=300, deadline=None)
@given(teams=st.dictionaries(st.sampled_from(TEAMS), team_block(), max_size=2), caller=callers, prompt=prompts)
def test_deny_by_default_property(teams: dict[str, dict[str, object]], caller: Caller, prompt: Prompt) -> None:
    """A caller whose team has no block is denied, whatever else the policy says."""
    p = parse_policy(to_yaml(teams), "gen.yaml")
    if caller.team not in teams:
        d = decide(p, caller, prompt)
        assert not d.allowed and d.rule.path == "default-deny"


RESTRICTIONS = [
    ("drop a model", lambda b, d: {**b, "models": b["models"][1:]}),
    ("drop an input kind", lambda b, d: {**b, "inputs": b["inputs"][1:] or b["inputs"]}),
    ("no streaming", lambda b, d: {**b, "stream": False}),
    ("no reasoning", lambda b, d: {**b, "reasoning": False}),
    ("refuse over the cap", lambda b, d: {**b, "over_max_tokens": "refuse"}),
    ("lower the cap", lambda b, d: {**b, "max_tokens": max(1, min(b.get("max_tokens", 300), d) // 2)}),
    ("limit input", lambda b, d: {**b, "max_input_chars": max(1, min(b.get("max_input_chars", 60), d))}),
    ("one image", lambda b, d: {**b, "images": {"max_count": 1}}),
    ("loopback only", lambda b, d: {**b, "clients": b.get("clients", ["127.0.0.0/8"])[:1]}),
    ("deny a detector", lambda b, d: {**b, "content": [*b["content"], {"detector": "email", "action": "deny"}]}),
    ("redact a detector", lambda b, d: {**b, "content": [*b["content"], {"detector": "card", "action": "redact"}]}),
]


@settings(max_examples=1500, deadline=None)
@given(
    block=team_block(),
    restriction=st.sampled_from(RESTRICTIONS),
    knob=st.integers(1, 300),
    caller=callers.map(lambda c: Caller("k", "a", c.client_addr)),
    prompt=prompts,
)
def test_adding_a_restriction_never_allows_more(
    block: dict[str, object], restriction: tuple[str, object], knob: int, caller: Caller, prompt: Prompt
) -> None:
    """Whatever a narrower policy allows, the wider one allowed too, on terms no looser."""
    _, narrow = restriction
    wide_p = parse_policy(to_yaml({"a": block}), "wide.yaml")
    try:
        narrow_p = parse_policy(to_yaml({"a": narrow(block, knob)}), "narrow.yaml")  # type: ignore[operator]
    except PolicyError:
        return  # a restriction that makes the file invalid loads nothing at all
    wide, tight = decide(wide_p, caller, prompt), decide(narrow_p, caller, prompt)
    if tight.allowed:
        assert wide.allowed
        bound = lambda d: d.max_tokens if d.max_tokens is not None else prompt.max_tokens  # noqa: E731
        if bound(wide) is not None:
            assert bound(tight) is not None and bound(tight) <= bound(wide)


def test_restrictions_in_a_key_override_also_never_widen() -> None:
    team = textwrap.dedent(
        """\
        version: 1
        teams:
          a:
            models: [tiny]
            max_tokens: 10
            keys:
              k:
                models: [tiny, llama]
                max_tokens: 500
                inputs: [text, image]
        """
    )
    p = policy(team)
    key = Caller("k", "a")
    assert not decide(p, key, Prompt("llama")).allowed
    assert decide(p, key, Prompt("tiny", max_tokens=400)).max_tokens == 10
    assert not decide(p, key, Prompt("tiny", media=(MediaPart("image", 1),))).allowed

"""Policy through the real gateway and the real vLLM engine: every rule allows
and denies, limits hold across replicas sharing Redis, redaction reaches the
engine, and reloads replace the policy atomically."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, SocketDouble, free_port, wav_bytes

pytestmark = pytest.mark.engine

RULES = """\
version: 1
detectors:
  employee_id: {pattern: 'EMP-[0-9]{6}'}
teams:
  open:
    models: [tiny]
    inputs: [text, image, audio]
    reasoning: true
    clients: [127.0.0.0/8]
    content:
      - {detector: email, action: redact}
      - {detector: card, action: deny}
      - {detector: employee_id, action: flag}
    keys:
      KEY_ID: {max_tokens: 2, over_max_tokens: refuse}
  narrow:
    models: ["other-*"]
  textonly:
    models: [tiny]
    stream: false
    max_tokens: 3
    max_input_chars: 50
  media:
    models: [tiny]
    inputs: [text, image, audio]
    max_input_bytes: 60
    images: {max_count: 1, max_bytes: 2000, max_pixels: 30}
    audio: {max_seconds: 1.0, max_bytes: 30000}
  faraway:
    models: [tiny]
    clients: [10.0.0.0/8]
"""


def image_part(size: int) -> dict[str, Any]:
    """A real PNG of at least `size` bytes (noise does not compress)."""
    side = max(2, int((size / 3) ** 0.5) + 2)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    data = base64.b64encode(out.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def chat_body(content: Any = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


def decision(gw: Gateway, response: httpx.Response) -> dict[str, Any]:
    final = gw.final(response.headers["x-request-id"])
    return {**json.loads(final["detail"])["policy"], "_final": final}


@pytest.fixture
def rules_gw(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> tuple[Gateway, dict[str, str]]:
    gw = make_gateway(engines=[vllm_engine], start=False)
    keys = {team: gw.create_key(name=team, team=team) for team in ("open", "narrow", "textonly", "media", "faraway")}
    keys["nobody"] = gw.create_key(team="nobody")
    keys["open-key"] = gw.create_key(name="override", team="open")
    (gw.config.parent / "policy.yaml").write_text(RULES.replace("KEY_ID", keys["open-key"].split("_")[1]))
    gw.start()
    return gw, keys


def test_a_rotated_key_keeps_its_id_and_so_its_policy_block(rules_gw: tuple[Gateway, dict[str, str]]) -> None:
    """A key is rotated by giving it a new secret under the same id. Its block
    in the policy (max_tokens 2, refuse) keeps governing it: a new key in its
    place would have had only its team's wider rules until someone edited the
    policy. The old secret works for the overlap, and its calls say so."""
    gw, keys = rules_gw
    old = keys["open-key"]
    key_id = old.split("_")[1]
    rotated = json.loads(gw.bastion("keys", "rotate", key_id, "--overlap", "1h", "--json").stdout)
    new = rotated["key"]
    assert new.split("_")[1] == key_id and new != old and rotated["previous_expires_at"]
    for key, generation in ((new, None), (old, "previous")):
        r = gw.post("/v1/chat/completions", key=key, json=chat_body(max_tokens=5))
        assert r.status_code == 400 and r.json()["error"]["code"] == "policy_limit_exceeded", r.text
        d = decision(gw, r)
        assert d["rule"] == f"teams.open.keys.{key_id}.over_max_tokens"
        assert d["_final"]["key_id"] == key_id
        assert json.loads(d["_final"]["detail"]).get("auth", {}).get("key_generation") == generation
    actions = [json.loads(r["detail"]) for r in gw.records() if r["route"] == "cli.keys.rotate"]
    assert actions == [{"key_id": key_id, "overlap_seconds": 3600}]


def test_every_rule_allows_and_denies_through_the_gateway(rules_gw: tuple[Gateway, dict[str, str]]) -> None:
    gw, keys = rules_gw
    post = lambda team, body: gw.post("/v1/chat/completions", key=keys[team], json=body)  # noqa: E731

    def denied(team: str, body: dict[str, Any], status: int, code: str, rule: str) -> dict[str, Any]:
        r = post(team, body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text
        d = decision(gw, r)
        assert d["decision"] == "deny" and d["rule"] == rule, d
        assert len(d["sha256"]) == 64
        assert rule == "default-deny" or d["line"] > 0, "a rule is named with its line"
        # Refused before the engine: in strict mode no intent record was written.
        assert [x["phase"] for x in gw.records(r.headers["x-request-id"])] == ["final"]
        return d

    def allowed(team: str, body: dict[str, Any]) -> dict[str, Any]:
        r = post(team, body)
        d = decision(gw, r)
        assert d["decision"] == "allow", (r.text, d)
        return {**d, "_response": r}

    # Deny by default: a team the policy does not name.
    d = denied("nobody", chat_body(), 403, "policy_denied", "default-deny")
    assert d["_final"]["error_type"] == "policy_denied"
    assert gw.get("/v1/models", key=keys["nobody"]).json()["data"] == []
    assert [m["id"] for m in gw.get("/v1/models", key=keys["open"]).json()["data"]] == ["tiny"]

    # Models: the same answer as an unknown model, so names do not leak.
    denied("narrow", chat_body(), 404, "model_not_found", "teams.narrow.models")
    assert allowed("open", chat_body())["_response"].status_code == 200

    # Input kinds: textonly takes text only (the default).
    denied(
        "textonly",
        chat_body([{"type": "text", "text": "hi"}, image_part(100)]),
        403,
        "policy_denied",
        "teams.textonly.inputs",
    )
    # Policy lets the image through; the text-only engine is then the one to refuse it.
    assert allowed("media", chat_body([{"type": "text", "text": "hi"}, image_part(10)]))["_response"].status_code == 400

    # Streaming, reasoning.
    denied("textonly", chat_body(stream=True), 403, "policy_denied", "teams.textonly.stream")
    assert allowed("open", chat_body(stream=True))["_response"].status_code == 200
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    denied("textonly", chat_body(**thinking), 403, "policy_denied", "teams.textonly.reasoning")
    assert allowed("open", chat_body(**thinking))["_response"].status_code == 200

    # max_tokens: clamped for textonly (cap 3), refused over the override's cap.
    clamped = allowed("textonly", chat_body(max_tokens=50, ignore_eos=True))
    assert clamped["max_tokens"] == 3 and clamped["max_tokens_clamped_from"] == 50
    assert clamped["_response"].json()["usage"]["completion_tokens"] == 3
    unbounded = allowed("textonly", {k: v for k, v in chat_body(ignore_eos=True).items() if k != "max_tokens"})
    assert unbounded["_response"].json()["usage"]["completion_tokens"] == 3, "no call leaves without a bound"
    denied(
        "open-key",
        chat_body(max_tokens=5),
        400,
        "policy_limit_exceeded",
        f"teams.open.keys.{keys['open-key'].split('_')[1]}.over_max_tokens",
    )
    assert allowed("open-key", chat_body(max_tokens=2))["_response"].status_code == 200

    # Input size.
    denied("textonly", chat_body("x" * 51), 400, "policy_limit_exceeded", "teams.textonly.max_input_chars")
    assert allowed("textonly", chat_body("x" * 50))["_response"].status_code == 200

    # Images: count, bytes, and a remote URL whose size cannot be checked.
    denied(
        "media",
        chat_body([image_part(10), image_part(10)]),
        400,
        "policy_limit_exceeded",
        "teams.media.images.max_count",
    )
    denied("media", chat_body([image_part(2001)]), 400, "policy_limit_exceeded", "teams.media.images.max_bytes")
    denied("media", chat_body([image_part(100)]), 400, "policy_limit_exceeded", "teams.media.images.max_pixels")

    # Audio length, read from the WAV header's byte rate.
    def audio(seconds: float, rate: int = 8000) -> dict[str, Any]:
        return {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(wav_bytes(seconds, rate)).decode(), "format": "wav"},
        }

    denied("media", chat_body([audio(1.5)]), 400, "policy_limit_exceeded", "teams.media.audio.max_seconds")
    # 0.9 s at 24 kHz is 43 kB: short enough, too many bytes.
    denied("media", chat_body([audio(0.9, 24000)]), 400, "policy_limit_exceeded", "teams.media.audio.max_bytes")
    allowed("media", chat_body([audio(0.5)]))

    # Input bytes: 31 characters, 62 bytes of UTF-8.
    denied("media", chat_body("é" * 31), 400, "policy_limit_exceeded", "teams.media.max_input_bytes")

    # Client addresses: the tests call from 127.0.0.1.
    denied("faraway", chat_body(), 403, "policy_denied", "teams.faraway.clients")
    # Naming another address in X-Forwarded-For changes nothing: no proxy is trusted.
    forged = {"x-forwarded-for": "10.1.2.3"}
    r = gw.post("/v1/chat/completions", key=keys["faraway"], json=chat_body(), headers=forged)
    d = decision(gw, r)
    assert r.status_code == 403 and d["rule"] == "teams.faraway.clients"
    assert d["_final"]["client_addr"] == "127.0.0.1"

    # A content part the gateway cannot read is refused, not passed on unchecked.
    r = post("open", chat_body([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].type"


def test_content_rules_deny_redact_and_flag_without_keeping_the_text(
    rules_gw: tuple[Gateway, dict[str, str]], vllm_engine: EngineRef
) -> None:
    gw, keys = rules_gw
    card = "4111 1111 1111 1111"
    r = gw.post("/v1/chat/completions", key=keys["open"], json=chat_body(f"pay with {card}"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
    d = decision(gw, r)
    assert d["rule"] == "teams.open.content[1]" and d["_final"]["error_type"] == "content_denied"
    assert card not in json.dumps(d, default=str)
    # Full-width digits are the same number to the model (policy.content.fold).
    wide = "４１１１ １１１１ １１１１ １１１１"
    r = gw.post("/v1/chat/completions", key=keys["open"], json=chat_body(f"pay with {wide}"))
    assert r.status_code == 400 and decision(gw, r)["rule"] == "teams.open.content[1]"

    # Redaction reaches the engine: `echo` makes vLLM return the prompt as it received it.
    prompt = "Write to jane.doe@bank.example about EMP-123456"
    r = gw.post(
        "/v1/completions", key=keys["open"], json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True}
    )
    assert r.status_code == 200, r.text
    echoed = r.json()["choices"][0]["text"]
    assert echoed.startswith("Write to [REDACTED:email] about EMP-123456"), echoed
    d = decision(gw, r)
    assert {(c["detector"], c["action"], c["count"]) for c in d["content"]} == {
        ("email", "redact", 1),
        ("employee_id", "flag", 1),
    }
    assert "jane.doe" not in json.dumps(d, default=str)
    # An address with a zero-width space in it is redacted whole, and nothing around it.
    prompt = "Write to jane\u200b.doe@bank.example now"
    r = gw.post(
        "/v1/completions", key=keys["open"], json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True}
    )
    assert r.json()["choices"][0]["text"].startswith("Write to [REDACTED:email] now"), r.text

    # Chat too: the engine counted the tokens of the redacted messages, not the original.
    messages = [
        {"role": "system", "content": "mail ops@bank.example"},
        {"role": "user", "content": [{"type": "text", "text": "and jane@bank.example"}]},
    ]
    r = gw.post("/v1/chat/completions", key=keys["open"], json={"model": "tiny", "messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text

    def engine_tokens(msgs: list[dict[str, Any]]) -> int:
        t = httpx.post(
            vllm_engine.url + "/tokenize",
            json={"model": "tiny", "messages": msgs},
            headers={"authorization": f"Bearer {vllm_engine.key}"},
            timeout=30,
        )
        return int(t.json()["count"])

    redacted = [
        {"role": "system", "content": "mail [REDACTED:email]"},
        {"role": "user", "content": [{"type": "text", "text": "and [REDACTED:email]"}]},
    ]
    assert engine_tokens(redacted) != engine_tokens(messages)
    assert r.json()["usage"]["prompt_tokens"] == engine_tokens(redacted)


def test_content_rules_refuse_text_they_cannot_read(rules_gw: tuple[Gateway, dict[str, str]]) -> None:
    # Tool definitions, tool calls, chat template arguments and some message
    # fields reach the chat template as text, but are not message content: a card number there went
    # past the card rule to the engine.
    gw, keys = rules_gw
    card = "4111 1111 1111 1111"
    tool = {"type": "function", "function": {"name": "pay", "description": f"pay with {card}", "parameters": {}}}
    call = {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": json.dumps({"card": card})}}
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    cases = {
        "tools": chat_body("hi", tools=[tool]),
        # Named by the field alone: the key is the caller's text (it was quoted into the record).
        "chat_template_kwargs": chat_body("hi", chat_template_kwargs={card: card}),
        "messages[1].tool_calls": {"model": "tiny", "messages": turns, "max_tokens": 1},
        "messages[0].name": chat_body("hi") | {"messages": [{"role": "user", "content": "hi", "name": card}]},
        # vLLM hands a developer message's tools, and any message's task, to the template as well.
        "messages[0].tools": chat_body("hi") | {"messages": [{"role": "developer", "content": "hi", "tools": [tool]}]},
        "messages[0].task": chat_body("hi") | {"messages": [{"role": "user", "content": "hi", "task": card}]},
    }
    for param, body in cases.items():
        r = gw.post("/v1/chat/completions", key=keys["open"], json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
        assert r.json()["error"]["param"] == param
        d = decision(gw, r)
        assert d["rule"] == "teams.open.content[0]" and d["_final"]["error_type"] == "content_denied"
        assert card not in json.dumps(d, default=str)
    for param, value in (("prompt_embeds", "AAAA"), ("suffix", card)):
        body = {"model": "tiny", "prompt": "hi", param: value, "max_tokens": 1}
        r = gw.post("/v1/completions", key=keys["open"], json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
        assert r.json()["error"]["param"] == param
    # The thinking switch is the gateway's to read; a team without content rules may send the rest.
    r = gw.post(
        "/v1/chat/completions", key=keys["open"], json=chat_body(chat_template_kwargs={"enable_thinking": False})
    )
    assert r.status_code == 200, r.text
    r = gw.post("/v1/chat/completions", key=keys["textonly"], json=chat_body(chat_template_kwargs={"note": card}))
    assert r.status_code == 200, r.text


LIMITS = """\
version: 1
teams:
  lim:
    models: ["*"]
    max_tokens: 4
    limits:
      per_key: {requests_per_minute: 3}
  tok:
    models: ["*"]
    max_tokens: 400
    limits:
      per_key: {tokens_per_minute: 1000}
  conc:
    models: ["*"]
    limits:
      per_team: {concurrent: 1}
"""


def test_rate_limits_answer_429_in_openai_style(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    hang = SocketDouble("hang")
    slow = EngineRef(name="slow", url=hang.url, key="k")
    try:
        gw = make_gateway(engines=[vllm_engine, slow], policy=LIMITS, gateway={"engine_read_timeout": 3.0})
        lim, lim2, tok, conc = (gw.create_key(team=t) for t in ("lim", "lim", "tok", "conc"))

        remaining = []
        for _ in range(3):
            r = gw.post("/v1/chat/completions", key=lim, json=chat_body())
            assert r.status_code == 200
            remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
            assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert remaining == [2, 1, 0]
        r = gw.post("/v1/chat/completions", key=lim, json=chat_body())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 15 <= int(r.headers["retry-after"]) <= 20  # one request is 20 s of refill at 3/min
        assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.headers["x-ratelimit-reset-requests"].endswith(
            "s"
        )
        d = decision(gw, r)
        assert d["decision"] == "deny" and d["rule"] == "teams.lim.limits.per_key.requests_per_minute"
        assert d["_final"]["error_type"] == "rate_limited" and d["_final"]["http_status"] == 429
        # Per key: another key of the team has its own allowance.
        assert gw.post("/v1/chat/completions", key=lim2, json=chat_body()).status_code == 200

        # Tokens: a call reserves max_tokens plus its prompt; an engine refusal gives it all back.
        # 1500 characters (≈375 tokens by the estimate) + 400 > the engine's 512-token context.
        long_prompt = chat_body("word " * 300, max_tokens=400)
        first = gw.post("/v1/chat/completions", key=tok, json=long_prompt)
        assert first.status_code == 400 and "context" in first.text.lower() or "max" in first.text.lower(), first.text
        assert int(first.headers.get("x-ratelimit-remaining-tokens", "0")) < 300
        # Without the refund this second reservation (~776 of 1000) could not fit for half a minute.
        again = gw.post("/v1/chat/completions", key=tok, json=long_prompt)
        assert again.status_code == 400, again.text
        big = gw.post("/v1/chat/completions", key=tok, json=chat_body("word " * 3000, max_tokens=400))
        assert big.status_code == 400 and big.json()["error"]["code"] == "policy_limit_exceeded"
        # Each of a call's choices may be max_tokens long: `n` of them, or one
        # per prompt of a completions batch. Reserving max_tokens once let
        # one call generate many times the team's whole allowance.
        for path, body in (
            ("/v1/chat/completions", chat_body(max_tokens=100) | {"n": 11}),
            ("/v1/completions", {"model": "tiny", "prompt": ["Hi"] * 11, "max_tokens": 100}),
            ("/v1/completions", {"model": "tiny", "prompt": [[1, 2]] * 4, "max_tokens": 100, "n": 3}),
        ):
            r = gw.post(path, key=tok, json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "policy_limit_exceeded", r.text
            final = decision(gw, r)["_final"]
            assert json.loads(final["detail"])["choices"] in (11, 12)
        batch = {"model": "tiny", "prompt": ["Hi"] * 2, "max_tokens": 5}
        assert gw.post("/v1/completions", key=tok, json=batch).status_code == 200
        r = gw.post("/v1/chat/completions", key=tok, json=chat_body() | {"n": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text

        # Concurrency: a call held by a hanging engine holds the team's only slot.
        held: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: held.update(
                r=gw.post("/v1/chat/completions", key=conc, json={**chat_body(), "model": "slow"})
            )
        )
        t.start()
        wait_for(lambda: hang.calls == 1)  # the slot is taken before the engine is called
        r = gw.post("/v1/chat/completions", key=conc, json=chat_body())
        assert r.status_code == 429 and decision(gw, r)["rule"] == "teams.conc.limits.per_team.concurrent"
        t.join(10)
        assert held["r"].status_code == 504
        # The slot is returned by a task after the answer, a moment later (0.3 s was
        # once too short a wait): the team's next call is served once it is back.
        wait_for(lambda: gw.post("/v1/chat/completions", key=conc, json=chat_body()).status_code != 429)
        assert gw.post("/v1/chat/completions", key=conc, json=chat_body()).status_code == 200
    finally:
        hang.close()


SHARED = """\
version: 1
teams:
  shared:
    models: [tiny]
    limits:
      per_team: {requests_per_minute: 5}
"""


def test_two_gateways_sharing_redis_hold_one_limit(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tmp_path: Path
) -> None:
    redis = {"rate_limits": {"backend": "redis", "key_prefix": f"bastion-test-{secrets.token_hex(4)}"}}
    db = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    one = make_gateway(engines=[vllm_engine], database_url=db, policy=SHARED, policy_settings=redis)
    two = make_gateway(engines=[vllm_engine], database_url=db, policy=SHARED, policy_settings=redis, start=False)
    # Replicas share the database and the key pepper, so a key works on both.
    pepper = Path("state/secrets/api-key-pepper")
    (two.config.parent / pepper).write_bytes((one.config.parent / pepper).read_bytes())
    two.start()
    key = one.create_key(team="shared")
    statuses = [
        (one if i % 2 else two).post("/v1/chat/completions", key=key, json=chat_body()).status_code for i in range(10)
    ]
    assert sorted(statuses) == [200] * 5 + [429] * 5, statuses
    assert httpx.get(one.url + "/readyz").json()["checks"]["rate_limit_store"] == "reachable"


def test_an_unreachable_redis_refuses_calls(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    down = {
        "rate_limits": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout_seconds": 0.2}
    }
    gw = make_gateway(engines=[vllm_engine], policy=SHARED, policy_settings=down)
    r = gw.post("/v1/chat/completions", key=gw.create_key(team="shared"), json=chat_body())
    assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limiter_unavailable"
    final = gw.final(r.headers["x-request-id"])
    assert final["error_type"] == "rate_limiter_unavailable"
    assert [x["phase"] for x in gw.records(r.headers["x-request-id"])] == ["final"]
    # Not ready, so that a load balancer sends calls to a gateway that can admit them.
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["rate_limit_store"] == "unreachable"
    assert "rate limit store unreachable" in ready.json()["error"]["message"]


ONLY_A = "version: 1\nteams:\n  a:\n    models: [tiny]\n"
A_AND_B = ONLY_A + "  b:\n    models: [tiny]\n"


def replace_file(path: Path, text: str) -> None:
    """Write a new policy the recommended way: a complete file renamed into place."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def policy_events(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.records() if r["route"].startswith("policy.")]


def wait_for(check, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_reload_on_change_and_refusal_of_an_invalid_policy(
    make_gateway: GatewayFactory, vllm_engine: EngineRef
) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=ONLY_A, policy_settings={"reload_seconds": 0.2})
    b = gw.create_key(team="b")
    path = gw.config.parent / "policy.yaml"
    assert gw.post("/v1/chat/completions", key=b, json=chat_body()).status_code == 403

    replace_file(path, A_AND_B)
    wait_for(lambda: gw.post("/v1/chat/completions", key=b, json=chat_body()).status_code == 200)
    events = policy_events(gw)
    assert [e["route"] for e in events] == ["policy.loaded", "policy.reloaded"]
    assert json.loads(events[1]["detail"])["teams"] == ["a", "b"]

    replace_file(path, A_AND_B + "    max_tokenz: 3\n")
    wait_for(lambda: len(policy_events(gw)) == 3)
    refused = policy_events(gw)[2]
    assert refused["route"] == "policy.reload_refused" and refused["outcome"] == "refused"
    assert "policy.yaml:7: teams.b.max_tokenz" in refused["error_message"]
    assert gw.post("/v1/chat/completions", key=b, json=chat_body()).status_code == 200, "the old policy stays"
    assert "policy.reload_refused" in gw.log_path.read_text()


def test_sighup_reload_under_load_loses_no_request(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    gw = make_gateway(engines=[vllm_engine], policy=A_AND_B, policy_settings={"reload_seconds": 0})
    key = gw.create_key(team="b")
    path = gw.config.parent / "policy.yaml"
    statuses: list[int] = []
    stop = threading.Event()

    def caller() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(
                    gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, json=chat_body()
                )
                statuses.append(r.status_code)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    assert gw.proc is not None
    for i in range(8):
        # Two valid policies that both allow team b, with different caps.
        replace_file(path, A_AND_B + f"    max_tokens: {i + 1}\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(60)
    assert statuses and set(statuses) == {200}, statuses
    wait_for(
        lambda: (
            len([r for r in gw.records() if r["phase"] == "final" and r["route"] == "/v1/chat/completions"])
            == len(statuses)
        )
    )
    reloads = [e for e in policy_events(gw) if e["route"] == "policy.reloaded"]
    assert len(reloads) == 8 and all(json.loads(e["detail"])["trigger"] == "sighup" for e in reloads)

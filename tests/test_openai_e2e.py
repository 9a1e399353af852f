"""The `openai` SDK through the gateway to the real vLLM CPU engine, audited on
SQLite and on the real PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway

pytestmark = pytest.mark.engine

# The random model ends its text at any token now and then (about one answer in
# 200 over four tokens); calls that count their tokens keep it going (vLLM's ignore_eos).
UNTIL_MAX_TOKENS = {"ignore_eos": True}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def gw(request: pytest.FixtureRequest, make_gateway: GatewayFactory, vllm_engine: EngineRef) -> Gateway:
    url = request.getfixturevalue("fresh_pg_url") if request.param == "postgres" else None
    return make_gateway(engines=[vllm_engine], database_url=url)


def test_chat_completion_is_answered_and_audited_with_engine_usage(gw: Gateway) -> None:
    key = gw.create_key(name="alice", team="risk")
    raw = gw.client(key).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    records = gw.records(request_id)
    assert [r["phase"] for r in records] == ["intent", "final"]
    final = records[1]
    assert final["outcome"] == "ok" and final["http_status"] == 200
    assert (final["prompt_tokens"], final["completion_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert final["key_name"] == "alice" and final["team"] == "risk" and final["role"] == "user"
    assert final["auth_method"] == "api_key" and key.split("_")[1] == final["key_id"]
    assert final["model"] == "tiny" and final["route"] == "/v1/chat/completions"
    assert final["client_addr"] == "127.0.0.1"
    assert final["response_sha256"] == hashlib.sha256(raw.http_response.content).hexdigest()
    assert final["request_sha256"] == hashlib.sha256(raw.http_request.content).hexdigest()
    assert final["latency_ms"] > 0 and final["ended_at"] >= final["started_at"]


def test_the_engine_names_each_call_by_its_audit_id_not_the_caller_s(gw: Gateway) -> None:
    """vLLM names a request by its `X-Request-Id` header, else by the body's
    `request_id`: the gateway sends the call's audit id, so the answer's `id`
    and the engine's log lines name the audit record, whatever the caller put
    in the body (before, `chatcmpl-<the caller's text>`)."""
    client = gw.client(gw.create_key())
    chosen = {"request_id": "chosen-by-caller"}
    messages = [{"role": "user", "content": "Hello"}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=2, extra_body=chosen
    )
    assert raw.parse().id == "chatcmpl-" + raw.headers["x-request-id"]
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=messages, max_tokens=2, stream=True, extra_body=chosen
    ) as streamed:
        ids = {chunk.id for chunk in streamed.parse()}
    assert ids == {"chatcmpl-" + streamed.headers["x-request-id"]}
    raw = client.completions.with_raw_response.create(model="tiny", prompt="Hi", max_tokens=2, extra_body=chosen)
    assert raw.parse().id == "cmpl-" + raw.headers["x-request-id"]


def test_every_role_openai_takes_reaches_the_engine(gw: Gateway) -> None:
    # The gateway refuses roles outside OpenAI's (tests/test_bad_input.py), not these.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "t", "tool_call_id": "c1"},
        {"role": "function", "content": "f", "name": "f"},
        {"role": "user", "content": "u"},
    ]
    r = gw.post(
        "/v1/chat/completions", key=gw.create_key(), json={"model": "tiny", "messages": messages, "max_tokens": 2}
    )
    assert r.status_code == 200, r.text


def test_stream_without_usage_request_still_audits_tokens_and_hides_usage_chunk(gw: Gateway) -> None:
    key = gw.create_key()
    with gw.client(key).chat.completions.with_streaming_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=6,
        stream=True,
        extra_body=UNTIL_MAX_TOKENS,
    ) as response:
        request_id = response.headers["x-request-id"]
        assert response.status_code == 200
        chunks = list(response.parse())
    assert chunks, "no chunks relayed"
    assert all(c.usage is None for c in chunks), "the usage chunk the client did not ask for must be stripped"
    assert all(c.choices for c in chunks)
    final = gw.final(request_id)
    assert final["stream"] and final["outcome"] == "ok"
    assert final["completion_tokens"] == 6 and final["prompt_tokens"] > 0


@pytest.mark.parametrize("options", ['"stream_options":null', '"stream\\u005foptions":null'])
def test_a_stream_that_turns_usage_off_is_still_counted(gw: Gateway, options: str) -> None:
    """The gateway's own `stream_options` wins over the caller's, however spelled.

    An escaped key with a null value once slipped past the gateway: it spliced
    its own `stream_options` in first, vLLM took the caller's (JSON's last key
    wins), sent no usage, and the record had no token counts."""
    key = gw.create_key()
    body = '{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"max_tokens":3,"ignore_eos":true,"stream":true,'
    response = gw.post("/v1/chat/completions", key=key, content=(body + options + "}").encode())
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert '"usage":{' not in response.text, "the usage chunk the client did not ask for must be stripped"
    final = gw.final(response.headers["x-request-id"])
    assert final["outcome"] == "ok" and final["completion_tokens"] == 3 and final["prompt_tokens"] > 0


def test_stream_with_usage_request_relays_usage_equal_to_the_audit(gw: Gateway) -> None:
    key = gw.create_key()
    with gw.client(key).chat.completions.with_streaming_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say something"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    final = gw.final(request_id)
    assert (final["prompt_tokens"], final["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_completions_streamed_and_not(gw: Gateway) -> None:
    key = gw.create_key()
    client = gw.client(key)
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="Once upon a time", max_tokens=4, extra_body=UNTIL_MAX_TOKENS
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    final = gw.final(raw.headers["x-request-id"])
    assert final["route"] == "/v1/completions" and final["completion_tokens"] == 4

    with client.completions.with_streaming_response.create(
        model="tiny", prompt="Once upon a time", max_tokens=3, stream=True, extra_body=UNTIL_MAX_TOKENS
    ) as response:
        request_id = response.headers["x-request-id"]
        text = "".join(c.choices[0].text for c in response.parse() if c.choices)
    assert isinstance(text, str)
    final = gw.final(request_id)
    assert final["stream"] and final["completion_tokens"] == 3


def test_models_lists_routable_models_and_is_audited(gw: Gateway) -> None:
    key = gw.create_key()
    raw = gw.client(key).models.with_raw_response.list()
    assert [m.id for m in raw.parse()] == ["tiny"]
    final = gw.final(raw.headers["x-request-id"])
    assert final["route"] == "/v1/models" and final["http_status"] == 200


def test_engine_error_is_relayed_in_openai_shape_and_audited(gw: Gateway) -> None:
    key = gw.create_key()
    # Longer than the engine's max_model_len (512): vLLM refuses with 400.
    r = gw.post("/v1/completions", key=key, json={"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4})
    assert r.status_code == 400
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    final = gw.final(r.headers["x-request-id"])
    assert final["http_status"] == 400 and final["outcome"] == "refused"
    assert final["error_type"].startswith("engine:")


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", "4111 1111 1111 1111"), ("logit_bias", {"4111 1111 1111 1111": 1})]
)
def test_an_engine_error_s_quote_of_the_request_is_not_recorded(gw: Gateway, field: str, value: object) -> None:
    """vLLM's message for a field it refuses quotes the value (pydantic's
    `'input': ...`, its own `value=[...]`); it went into the record's
    error_message, so a card number sent where the gateway reads nothing was
    kept in plain text by a trail that keeps only hashes of requests."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
    r = gw.post("/v1/chat/completions", key=gw.create_key(), json=body)
    assert r.status_code == 400 and "4111 1111 1111 1111" in r.json()["error"]["message"], r.text  # the caller's own
    final = gw.final(r.headers["x-request-id"])
    assert final["error_type"].startswith("engine:") and "4111" not in final["error_message"]
    assert f"about '{field}'" in final["error_message"]
    assert final["response_sha256"] == hashlib.sha256(r.content).hexdigest()


def test_readyz_reports_engine_and_audit_store(gw: Gateway) -> None:
    import httpx

    r = httpx.get(gw.url + "/readyz")
    assert r.status_code == 200
    checks = r.json()["checks"]
    assert checks["engines"] == {"tiny": "healthy"} and checks["audit_store"] == "writable"
    assert checks["rate_limit_store"] == "reachable"
    assert checks["models"]["tiny"]["status"] == "verified" and checks["models"]["tiny"]["problems"] == []


def test_no_answer_may_be_kept_by_a_cache_on_the_way(gw: Gateway) -> None:
    """Answers hold prompts, completions and audit records (a decrypted prompt
    among them): every one says `no-store` to proxies and browsers, and
    `nosniff`. They carried neither; a stream said only `no-cache`."""
    import httpx

    key, auditor = gw.create_key(), gw.create_key(role="auditor")
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    answered = gw.post("/v1/chat/completions", key=key, json=chat)
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={**chat, "stream": True},
        headers={"authorization": f"Bearer {key}"}, timeout=30,
    ) as streamed:  # fmt: skip
        streamed.read()
    for r in (
        answered,
        streamed,
        gw.post("/v1/chat/completions", key="bst_nope_nope", json=chat),  # refused
        gw.get("/v1/models", key=key),
        gw.get("/admin/audit/events", key=auditor, params={"limit": 1}),
        gw.get("/admin/audit/events/" + answered.headers["x-request-id"], key=auditor),
        gw.get("/admin/audit/events", key=auditor, params={"format": "csv"}),
    ):
        assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)
        assert r.headers.get("x-content-type-options") == "nosniff", (r.request.url, r.headers)

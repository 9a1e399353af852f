"""Thinking mode as the model's deployment guide asks for it (LangChain's
`extra_body`), mapped to vLLM's chat template, and the model's reasoning kept
from callers who did not ask for it or may not have it.

The session engine runs vLLM's deepseek_r1 reasoning parser over the tiny
model, whose chat template opens the answer with `<think>` when
`enable_thinking` reaches it. Left alone, the random model closes its thinking
(`</think>`) or ends its text at any token, about one answer in 200 over four
tokens: the calls here forbid both (`steady`), so every answer is reasoning only
and as long as `max_tokens`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI

from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway

pytestmark = pytest.mark.engine

POLICY = """\
version: 1
teams:
  thinkers:
    models: [tiny]
    reasoning: true
  plain:
    models: [tiny]
"""


@pytest.fixture
def gw(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> Gateway:
    return make_gateway(engines=[vllm_engine], policy=POLICY)


@pytest.fixture
def steady(vllm_engine: EngineRef) -> dict[str, Any]:
    """vLLM sampling options that keep the model thinking for all of `max_tokens`."""
    added = json.loads((Path(vllm_engine.model_dir) / "tokenizer.json").read_text())["added_tokens"]
    think_end = next(t["id"] for t in added if t["content"] == "</think>")
    return {"logit_bias": {str(think_end): -100}, "ignore_eos": True}


def chat(gw: Gateway, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, **extra}
    return gw.post("/v1/chat/completions", key=key, json=body)


def stream_events(gw: Gateway, key: str, **extra: Any) -> tuple[str, list[dict[str, Any]]]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={**body, **extra},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        return r.headers["x-request-id"], [json.loads(line[6:]) for line in lines]


def chat_finals(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The chat calls' final records, once `count` have landed (a stream's is written
    just after its last chunk, so it can trail the client by a moment)."""
    deadline = time.monotonic() + 10
    while True:
        finals = [r for r in gw.records() if r["phase"] == "final" and r["route"] == "/v1/chat/completions"]
        if len(finals) >= count or time.monotonic() > deadline:
            assert len(finals) == count, finals
            return finals
        time.sleep(0.05)


def test_langchain_thinking_and_streaming_end_to_end(gw: Gateway, steady: dict[str, Any]) -> None:
    key = gw.create_key(team="thinkers")
    llm = ChatOpenAI(
        model="tiny",
        base_url=gw.url + "/v1",
        api_key=key,
        max_tokens=4,
        max_retries=0,
        extra_body={"enable_thinking": True, "return_reasoning": True, **steady},
        streaming=True,
    )
    chunks = list(llm.stream("Hello there"))
    assert chunks, "nothing streamed"
    thinking = chat_finals(gw, 1)[-1]
    assert thinking["outcome"] == "ok" and thinking["stream"] and thinking["completion_tokens"] == 4
    assert json.loads(thinking["detail"])["reasoning"] == {"enabled": True, "returned": True}

    plain_llm = ChatOpenAI(
        model="tiny", base_url=gw.url + "/v1", api_key=key, max_tokens=4, max_retries=0, streaming=True
    )
    list(plain_llm.stream("Hello there"))
    plain = chat_finals(gw, 2)[-1]
    # `enable_thinking` reached the chat template: it added "<think>\n" (2 tokens) to the prompt.
    assert thinking["prompt_tokens"] == plain["prompt_tokens"] + 2


def test_reasoning_is_returned_only_when_asked_for_and_allowed(gw: Gateway, steady: dict[str, Any]) -> None:
    thinker, plain = gw.create_key(team="thinkers"), gw.create_key(team="plain")

    asked = chat(gw, thinker, enable_thinking=True, return_reasoning=True, **steady).json()["choices"][0]["message"]
    # Its text may be empty: three random tokens can all be pieces of one
    # character, which vLLM holds back (CI saw it once). What the gateway
    # decides is whether the field reaches the caller.
    assert isinstance(asked.get("reasoning"), str), asked
    not_asked = chat(gw, thinker, enable_thinking=True, **steady).json()["choices"][0]["message"]
    assert "reasoning" not in not_asked and "reasoning_content" not in not_asked

    # Streamed: the reasoning deltas go only to the caller who asked.
    request_id, events = stream_events(gw, thinker, return_reasoning=True, **steady)
    assert any(e["choices"] and "reasoning" in e["choices"][0]["delta"] for e in events)
    request_id, events = stream_events(gw, thinker, **steady)
    assert events and not any(e["choices"] and "reasoning" in e["choices"][0]["delta"] for e in events)
    assert gw.final(request_id)["completion_tokens"] == 4, "tokens are audited whatever is kept from the client"

    # A team whose policy does not allow reasoning never gets it, even when asking.
    r = chat(gw, plain, return_reasoning=True)
    assert r.status_code == 200 and "reasoning" not in r.json()["choices"][0]["message"]
    assert json.loads(gw.final(r.headers["x-request-id"])["detail"])["reasoning"] == {
        "enabled": False,
        "returned": False,
    }
    assert chat(gw, plain, enable_thinking=True).status_code == 403


def test_reasoning_effort_asks_for_thinking(gw: Gateway) -> None:
    """vLLM turns the template's thinking on for any `reasoning_effort` but "none"
    when nothing sets `enable_thinking`: to policy and the record, that is asking."""
    thinker, plain = gw.create_key(team="thinkers"), gw.create_key(team="plain")
    base = chat(gw, plain).json()["usage"]["prompt_tokens"]

    r = chat(gw, thinker, reasoning_effort="high")
    assert r.status_code == 200, r.text
    # It reached the chat template: "<think>\n" (2 tokens) opens the answer.
    assert r.json()["usage"]["prompt_tokens"] == base + 2
    assert json.loads(gw.final(r.headers["x-request-id"])["detail"])["reasoning"]["enabled"] is True

    refused = chat(gw, plain, reasoning_effort="high")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "policy_denied", refused.text
    assert gw.final(refused.headers["x-request-id"])["error_type"] == "policy_denied"
    # Not asking: the effort "none", or thinking switched off either way the gateway takes it.
    for extra in (
        {"reasoning_effort": "none"},
        {"reasoning_effort": "high", "enable_thinking": False},
        {"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}},
    ):
        r = chat(gw, plain, **extra)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == base, (extra, r.text)


def test_the_thinking_switch_is_true_or_false(gw: Gateway) -> None:
    """A chat template tests `enable_thinking` as it is: the string "no" is true
    to Jinja, and turned thinking on for a key that may not have it."""
    plain = gw.create_key(team="plain")
    for value in ("no", 1, [], {"x": 1}):
        r = chat(gw, plain, chat_template_kwargs={"enable_thinking": value})
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"
        assert gw.final(r.headers["x-request-id"])["error_type"] == "invalid_body"
    assert chat(gw, plain, chat_template_kwargs={"enable_thinking": None}).status_code == 200


def test_hidden_reasoning_cannot_be_read_back_from_logprobs_or_token_ids(gw: Gateway, steady: dict[str, Any]) -> None:
    """vLLM's logprobs and token ids list every generated token, the thinking's
    too: a team whose policy forbids reasoning read it back from them."""
    thinker, plain = gw.create_key(team="thinkers"), gw.create_key(team="plain")
    detail = {"logprobs": True, "top_logprobs": 2, "return_token_ids": True, **steady}

    shown = chat(gw, thinker, enable_thinking=True, return_reasoning=True, **detail).json()["choices"][0]
    assert len(shown["logprobs"]["content"]) == 3 and len(shown["token_ids"]) == 3  # the control: asked and allowed
    for key, extra in ((plain, {}), (thinker, {"enable_thinking": True})):
        r = chat(gw, key, **extra, **detail)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert "reasoning" not in choice["message"]
        assert choice["logprobs"] is None and choice["token_ids"] is None, choice
        assert gw.final(r.headers["x-request-id"])["completion_tokens"] == 3

        _, events = stream_events(gw, key, **extra, **detail)
        choices = [e["choices"][0] for e in events if e["choices"]]
        assert len(choices) >= 4, events  # the role chunk, then one per token
        assert not any(c.get("logprobs") or c.get("token_ids") or "reasoning" in c["delta"] for c in choices)

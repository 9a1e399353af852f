"""The engine's prefix cache is shared only within a team (`gateway.prefix_cache_scope`).

A prompt whose prefix is in vLLM's cache is answered faster, so a caller who
shares the cache with another can time whether that other sent a given text.
The gateway sets vLLM's `cache_salt` on every call, over any the caller sent.
"""

from __future__ import annotations

import json
import secrets

import pytest

from gateway.summary import body_for_engine, prefix_cache_salt, summarize
from tests.conftest import GatewayFactory
from tests.support import EngineRef, engine_metric

SALT = prefix_cache_salt("team", "risk", "k1")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"cache_salt":"theirs"}',
        # The same key, escaped: a byte search would miss it, and the caller's
        # would come after a spliced one (JSON's last key wins in vLLM).
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"cache_s\\u0061lt":"theirs"}',
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}',
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{}}',
    ],
)
def test_the_gateway_s_salt_replaces_the_caller_s(body: bytes) -> None:
    out = body_for_engine(body, summarize("chat", body), cache_salt=SALT)
    assert out.count(b'"cache_salt"') == 1 and b"cache_s\\u0061lt" not in out, out
    data = json.loads(out)
    assert data["cache_salt"] == SALT
    assert data["messages"] == [{"role": "user", "content": "hi"}]
    if data.get("stream"):
        assert data["stream_options"] == {"include_usage": True}


def test_salts_by_scope() -> None:
    assert prefix_cache_salt("team", "risk", "k1") == prefix_cache_salt("team", "risk", "k2") != SALT.upper()
    assert prefix_cache_salt("team", "risk", "k1") != prefix_cache_salt("team", "ops", "k1")
    assert prefix_cache_salt("key", "risk", "k1") != prefix_cache_salt("key", "risk", "k2")
    assert prefix_cache_salt("shared", "risk", "k1") is None
    body = b'{"model":"m","messages":[]}'
    assert body_for_engine(body, summarize("completions", b'{"model":"m","prompt":"x"}'), cache_salt=None) == body
    # vLLM takes up to 128 characters, none of / @ \ NUL.
    assert len(SALT) == 32 and SALT.isalnum()


TEAMS = "version: 1\nteams:\n" + "".join(f"  {t}:\n    models: ['*']\n" for t in ("a", "b"))


@pytest.mark.engine
def test_another_team_never_hits_a_team_s_cached_prompt(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    """Before the salt, team b's first call of team a's prompt hit 256 cached tokens."""
    gw = make_gateway(engines=[vllm_engine], policy=TEAMS)
    a, a2, b = gw.create_key(team="a"), gw.create_key(team="a"), gw.create_key(team="b")

    def hit_tokens(key: str, text: str, **extra: str) -> float:
        """Prompt tokens the engine found in its cache for this call."""
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 1, **extra}
        before = engine_metric(vllm_engine, "vllm:prefix_cache_hits_total")
        assert gw.post("/v1/chat/completions", key=key, json=body).status_code == 200
        return engine_metric(vllm_engine, "vllm:prefix_cache_hits_total") - before

    def new_prompt() -> str:
        return " ".join(secrets.token_hex(3) for _ in range(40))  # about 300 tokens the engine never saw

    secret = new_prompt()
    assert hit_tokens(a, secret) == 0
    assert hit_tokens(a2, secret) > 0, "the cache is shared within a team (the control: caching is on)"
    assert hit_tokens(b, secret) == 0
    # Nor does naming team a's salt help: the gateway's replaces the caller's.
    secret = new_prompt()
    assert hit_tokens(a, secret) == 0
    assert hit_tokens(b, secret, cache_salt=prefix_cache_salt("team", "a", "")) == 0

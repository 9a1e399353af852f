"""TLS when given a certificate; JSON logs with request ids and no secrets."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support import EngineRef, SocketDouble, self_signed


def test_gateway_serves_tls_with_a_certificate(
    make_gateway: GatewayFactory, tripwire: SocketDouble, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"tls_cert": str(cert), "tls_key": str(key)})
    assert gw.url.startswith("https://")
    api_key = gw.create_key()
    with httpx.Client(verify=gw.verify) as http_client:
        models = gw.client(api_key, http_client=http_client).models.list()
    assert [m.id for m in models] == ["m"]
    # Plain HTTP on the TLS port gets no answer; an untrusting client refuses the certificate.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gw.port}/healthz", timeout=2).raise_for_status()
    with pytest.raises(httpx.ConnectError):
        httpx.get(gw.url + "/healthz", timeout=2)


def test_logs_are_json_with_request_ids_and_no_secrets(make_gateway: GatewayFactory, tripwire: SocketDouble) -> None:
    gw = make_gateway(engines=[EngineRef("m", tripwire.url, "k")], gateway={"engine_read_timeout": 0.5})
    key = gw.create_key()
    prompt = "my account number is 4111-SECRET-PROMPT"
    r = gw.post("/v1/chat/completions", key=key, json={"model": "m", "messages": [{"role": "user", "content": prompt}]})
    wrong = gw.post("/v1/chat/completions", json={}, headers={"authorization": "Bearer bst_abcdefabcdef_" + "Z" * 43})
    gw.stop()
    text = gw.log_path.read_text()
    # Every line is JSON, the server's own lines (start, shutdown) included.
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("logger", "").startswith("uvicorn") for line in lines)
    calls = {line["request_id"]: line for line in lines if line.get("event") == "call"}
    assert r.headers["x-request-id"] in calls and wrong.headers["x-request-id"] in calls
    assert calls[r.headers["x-request-id"]]["status"] == 504
    assert key not in text and key.split("_", 2)[2] not in text
    assert "SECRET-PROMPT" not in text and "Z" * 43 not in text

"""Remote images the gateway fetches itself, from hosts the operator allows.

A real HTTP server on loopback plays the image host; the gateway must fetch
only from listed host:port pairs, never follow a redirect, cut off an answer
past the byte limit or the time limit, type the bytes by sniffing them, and
forward a data: URL so that the engine never fetches anything.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from gateway.summary import body_for_engine, summarize
from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, SocketDouble

PNG = io.BytesIO()
Image.new("RGB", (16, 16), (10, 200, 30)).save(PNG, "PNG")
PNG_BYTES = PNG.getvalue()
MAX_BYTES = 50_000
BOMB = gzip.compress(PNG_BYTES[:8] + bytes(25_000_000), compresslevel=9)


class ImageHost:
    """A loopback HTTP server with one path per behaviour; it logs every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, user-agent)
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.requests.append((self.path, self.headers.get("user-agent", "")))
                path = self.path.split("?", 1)[0]
                if path == "/ok.png":
                    self._send(200, PNG_BYTES, "image/png")
                elif path == "/lies.png":  # a PNG served as text: the bytes decide
                    self._send(200, PNG_BYTES, "text/plain")
                elif path == "/text.png":
                    self._send(200, b"not an image at all", "image/png")
                elif path == "/redirect.png":
                    self.send_response(302)
                    self.send_header("location", "/ok.png")
                    self.send_header("content-length", "0")
                    self.end_headers()
                elif path == "/big.png":  # no content-length: only counting the bytes stops it
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("connection", "close")
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        self.wfile.write(PNG_BYTES[:8] + b"\0" * (MAX_BYTES * 4))
                elif path == "/bomb.png":  # 25 MB of zeros after a PNG header, gzipped to about 25 kB
                    self.send_response(200)
                    self.send_header("content-type", "image/png")
                    self.send_header("content-encoding", "gzip")
                    self.send_header("content-length", str(len(BOMB)))
                    self.end_headers()
                    self.wfile.write(BOMB)
                elif path == "/slow.png":
                    time.sleep(3)
                    self._send(200, PNG_BYTES, "image/png")
                else:
                    self._send(404, b"no", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


def fetch_toml(host: ImageHost, **extra: Any) -> str:
    settings = {"allow_hosts": [f"127.0.0.1:{host.port}"], "allow_http": True, "max_bytes": MAX_BYTES,
                "timeout_seconds": 1.0, **extra}  # fmt: skip
    return "[media.fetch]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def ask(gw: Gateway, key: str, url: str) -> Any:
    body = {"model": "tiny", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}
    ]}  # fmt: skip
    return gw.post("/v1/chat/completions", key=key, json=body)


@pytest.mark.engine
def test_an_allowed_image_is_fetched_by_the_gateway_and_never_by_the_engine(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, image_host: ImageHost
) -> None:
    gw = make_gateway(engines=[vllm_engine], extra_toml=fetch_toml(image_host))
    key = gw.create_key()
    for path in ("/ok.png?sig=secret-token", "/lies.png"):
        r = ask(gw, key, image_host.url(path))
        # The text-only test engine refuses the image itself: the gateway fetched, checked and forwarded it.
        assert r.status_code == 400 and r.json()["error"]["code"] != "invalid_media", r.text
        media = json.loads(gw.final(r.headers["x-request-id"])["detail"])["media"]
        assert media == [{"kind": "image", "mime": "image/png", "size": len(PNG_BYTES), "pixels": 256,
                          "sha256": hashlib.sha256(PNG_BYTES).hexdigest(),
                          "fetched_from": image_host.url(path.split("?")[0])}]  # fmt: skip
    # One request per call, each from the gateway; the engine fetched nothing.
    assert [(p, ua) for p, ua in image_host.requests] == [
        ("/ok.png?sig=secret-token", "bastion-image-fetch"),
        ("/lies.png", "bastion-image-fetch"),
    ]


@pytest.mark.engine
def test_failed_fetches_are_refused_and_audited_before_the_engine(
    make_gateway: GatewayFactory, tripwire: SocketDouble, image_host: ImageHost
) -> None:
    gw = make_gateway(engines=[EngineRef("tiny", tripwire.url, "k")], extra_toml=fetch_toml(image_host))
    key = gw.create_key()
    cases = {
        "/redirect.png": "media_fetch_failed",
        "/missing.png": "media_fetch_failed",
        "/big.png": "media_too_large",
        "/slow.png": "media_fetch_failed",
        "/text.png?sig=secret-token": "media_type_mismatch",
        # Decoded, this would have been 25 MB in memory before the byte limit saw it.
        "/bomb.png": "media_fetch_failed",
    }
    for path, reason in cases.items():
        started = time.monotonic()
        r = ask(gw, key, image_host.url(path))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_media", (path, r.text)
        assert time.monotonic() - started < 2.5, f"{path}: the fetch was not cut off at its time limit"
        records = gw.records(r.headers["x-request-id"])
        assert [(x["phase"], x["error_type"]) for x in records] == [("final", reason)], (path, records)
    # The redirect was not followed: its target was never asked for.
    assert "/ok.png" not in [p for p, _ in image_host.requests]
    assert tripwire.calls == 0
    # A presigned URL's query is a credential: the audit keeps the URL without
    # it, and the log (httpx writes every request's URL at INFO) has no trace of it.
    gw.stop()
    assert "secret-token" not in gw.log_path.read_text()


@pytest.mark.engine
def test_a_request_over_the_media_part_ceiling_fetches_and_decodes_nothing(
    make_gateway: GatewayFactory, tripwire: SocketDouble, image_host: ImageHost
) -> None:
    """With no count in policy, one request of 10 MB held 80,000 one-pixel
    GIFs (3 s of decoding, a 10 MB audit record); remote URLs on the allow-list
    were all fetched, one call making the gateway hit the listed host."""
    gw = make_gateway(
        engines=[EngineRef("tiny", tripwire.url, "k")], extra_toml=fetch_toml(image_host) + "[media]\nmax_parts = 3\n"
    )
    key = gw.create_key()
    part = {"type": "image_url", "image_url": {"url": image_host.url("/ok.png")}}
    body = {
        "model": "tiny",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *[part] * 4]}],
    }
    r = gw.post("/v1/chat/completions", key=key, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "messages[0].content[4]", "code": "invalid_media"
    }  # fmt: skip
    assert gw.final(r.headers["x-request-id"])["error_type"] == "media_too_many"
    assert image_host.requests == [] and tripwire.calls == 0


@pytest.mark.engine
def test_only_listed_hosts_and_schemes_are_fetched(
    make_gateway: GatewayFactory, tripwire: SocketDouble, image_host: ImageHost
) -> None:
    other = ImageHost()  # a second loopback server, not on the list
    try:
        gw = make_gateway(engines=[EngineRef("tiny", tripwire.url, "k")], extra_toml=fetch_toml(image_host))
        key = gw.create_key()
        refused = [
            other.url("/ok.png"),  # same address, unlisted port
            f"http://localhost:{image_host.port}/ok.png",  # listed address under another name
            f"http://user:pw@127.0.0.1:{image_host.port}/ok.png",  # credentials in the URL
            "file:///etc/passwd",
            f"ftp://127.0.0.1:{image_host.port}/ok.png",
        ]
        for url in refused:
            r = ask(gw, key, url)
            assert r.status_code == 400, (url, r.text)
            assert gw.records(r.headers["x-request-id"])[0]["error_type"] == "media_remote_url", url
        assert image_host.requests == [] and other.requests == []
        # https only unless allow_http: the same listed host over http is refused.
        strict = make_gateway(engines=[EngineRef("tiny", tripwire.url, "k")],
                              extra_toml=fetch_toml(image_host, allow_http=False))  # fmt: skip
        r = ask(strict, strict.create_key(), image_host.url("/ok.png"))
        assert r.status_code == 400 and image_host.requests == []
    finally:
        other.close()
    assert tripwire.calls == 0


@pytest.mark.engine
def test_a_caller_who_may_not_send_images_makes_the_gateway_fetch_nothing(
    make_gateway: GatewayFactory, tripwire: SocketDouble, image_host: ImageHost
) -> None:
    policy = "version: 1\nteams:\n  default:\n    models: ['*']\n    inputs: [text]\n"
    gw = make_gateway(engines=[EngineRef("tiny", tripwire.url, "k")], extra_toml=fetch_toml(image_host), policy=policy)
    r = ask(gw, gw.create_key(), image_host.url("/ok.png"))
    assert r.status_code == 403, r.text
    assert image_host.requests == [] and tripwire.calls == 0


def test_the_forwarded_body_carries_the_fetched_data_url_not_the_remote_one() -> None:
    remote = "https://images.example.internal/cat.png"
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": remote}}]}]}).encode()  # fmt: skip
    summary = summarize("chat", body)
    out = json.loads(body_for_engine(body, summary, image_urls={"messages[0].content[1]": "data:image/png;base64,AA"}))
    assert out["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    assert remote.encode() not in json.dumps(out).encode()

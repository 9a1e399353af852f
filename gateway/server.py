"""Serve the gateway with uvicorn (uvloop + httptools), plain or TLS."""

from __future__ import annotations

import ssl

import uvicorn

from engine.manifest import Verification
from gateway.app import create_app
from gateway.mtls import TlsPeerProtocol
from gateway.settings import Settings


def uvicorn_config(settings: Settings, preverified: dict[str, Verification] | None = None) -> uvicorn.Config:
    g = settings.gateway
    tls: dict[str, object] = {}
    http: str | type[TlsPeerProtocol] = "httptools"
    if g.tls_cert:
        tls = {
            "ssl_certfile": str(settings.path(g.tls_cert)),
            "ssl_keyfile": str(settings.path(g.tls_key)),
            "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        }
        m = settings.auth.mtls
        if m.client_ca and not m.proxy_header:
            # Mutual TLS: no certificate from the client CA, no connection.
            tls.update(ssl_ca_certs=str(settings.path(m.client_ca)), ssl_cert_reqs=ssl.CERT_REQUIRED)
            http = TlsPeerProtocol
    return uvicorn.Config(
        create_app(settings, preverified),
        host=g.host,
        port=g.port,
        loop="uvloop",
        http=http,
        lifespan="on",
        # Our own structured line per call replaces the access log.
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=30,
        **tls,  # type: ignore[arg-type]
    )


def make_server(settings: Settings, preverified: dict[str, Verification] | None = None) -> uvicorn.Server:
    return uvicorn.Server(uvicorn_config(settings, preverified))

"""Serve the gateway with uvicorn (uvloop + httptools), plain or TLS, in one
process or several (`gateway.workers`).

Several workers share one listening socket under uvicorn's supervisor, which
restarts a worker that dies and, on SIGHUP, replaces them one at a time (each
replacement serving before the old one stops). Every worker is a whole gateway:
its own audit stream, engine pool and boot verification of the models (`up`
hands them the result of its own instead), finished before it takes calls.
"""

from __future__ import annotations

import functools
import ssl

import uvicorn
from litestar import Litestar
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from engine.manifest import Verification
from gateway import logs
from gateway.app import create_app
from gateway.client_address import Networks
from gateway.connection_limits import ConnectionLimits
from gateway.http_protocol import GatewayHttpProtocol
from gateway.mtls import TlsPeerProtocol
from gateway.settings import Settings


def uvicorn_config(settings: Settings, preverified: dict[str, Verification] | None = None) -> uvicorn.Config:
    g = settings.gateway
    tls: dict[str, object] = {}
    http: type[GatewayHttpProtocol] = GatewayHttpProtocol
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
    several = g.workers > 1
    return uvicorn.Config(
        # A worker is a fresh process (spawned): it gets what builds the app, not the app.
        functools.partial(worker_app, settings, preverified) if several else create_app(settings, preverified),
        factory=several,
        workers=g.workers,
        host=g.host,
        port=g.port,
        loop="uvloop",
        http=functools.partial(
            http,
            header_timeout=g.header_timeout_seconds,
            body_timeout=g.body_timeout_seconds,
            send_timeout=g.send_timeout_seconds,
            limits=ConnectionLimits(g.max_connections, g.max_connections_per_client, Networks(g.trusted_proxies)),
        ),
        lifespan="on",
        # uvicorn's default, 5 s, is also how long httpx keeps an idle connection (settings.py).
        timeout_keep_alive=g.keepalive_timeout_seconds,
        # Our own structured line per call replaces the access log.
        access_log=False,
        log_config=None,
        server_header=False,
        # X-Forwarded-For is ours to read, and only from gateway.trusted_proxies
        # (gateway/client_address.py); uvicorn's would trust any local process.
        proxy_headers=False,
        timeout_graceful_shutdown=30,
        **tls,  # type: ignore[arg-type]
    )


def worker_app(settings: Settings, preverified: dict[str, Verification] | None) -> Litestar:
    """The app, built inside a worker process (which also sets up its own logging)."""
    logs.configure(settings.logging.level)
    return create_app(settings, preverified)


def serve(settings: Settings, preverified: dict[str, Verification] | None = None) -> bool:
    """Serve until stopped (SIGINT or SIGTERM); False if the gateway never started."""
    config = uvicorn_config(settings, preverified)
    # The socket is bound here, however many workers: left to uvicorn, one
    # worker's would be asyncio's, which on "::" takes IPv6 only, while several
    # share this one, which takes IPv4 too. It listens once the app has started.
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged why: the address is taken, or not this host's
        return False
    if config.workers == 1:
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        return server.started
    supervisor = Multiprocess(config, sockets=[sock])
    supervisor.run()
    # The supervisor stops everything when a worker cannot start (it would fail again).
    return all(p.exitcode != STARTUP_FAILURE for p in supervisor.processes)

"""The Litestar application: routes, lifespan, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import structlog
from litestar import Litestar, Request, Response, get, post, route
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.types import Method

from engine.manifest import Verification
from gateway import auditor, calls, connection_limits
from gateway.errors import ErrorBody, ErrorEnvelope, InternalError
from gateway.services import Services
from gateway.settings import Settings

log = structlog.get_logger("bastion.app")

# The collector's thresholds once started (CPython's defaults are 700, 10, 10):
# a young collection per 50,000 objects still alive, a full one almost never.
GC_THRESHOLDS = (50_000, 20, 100)
ALL_METHODS: list[Method] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _svc(request: Request[Any, Any, Any]) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await calls.inference(request, _svc(request), "chat", "/v1/chat/completions")


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await calls.inference(request, _svc(request), "completions", "/v1/completions")


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await calls.list_models(request, _svc(request))


@post("/admin/models/verify", status_code=200)
async def admin_verify_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await calls.verify_models(request, _svc(request))


@get("/admin/audit/events")
async def audit_events(request: Request[Any, Any, Any]) -> Response[Any]:
    return await auditor.events(request, _svc(request))


@get("/admin/audit/events/{request_id:str}")
async def audit_event(request: Request[Any, Any, Any], request_id: str) -> Response[bytes]:
    return await auditor.event(request, _svc(request), request_id)


@get("/admin/audit/stats")
async def audit_stats(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await auditor.stats(request, _svc(request))


@get("/admin/audit/verify")
async def audit_verify(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await auditor.verify(request, _svc(request))


def _wrong_methods(handler: HTTPRouteHandler) -> list[HTTPRouteHandler]:
    """Handlers for every other method on `handler`'s paths: a 405 in OpenAI's
    shape, with an `allow` header and an audit record like every refusal
    (Litestar's own 405 comes from an exception handler, which cannot await the audit writer)."""
    allowed = sorted(handler.http_methods)
    # OPTIONS stays Litestar's own: 204 with an `allow` header on every path.
    others: list[Method] = [m for m in ALL_METHODS if m not in allowed and m != "OPTIONS"]

    async def refuse(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await calls.wrong_method(request, _svc(request), allowed)

    return [
        route(path, http_method=others, status_code=405, name=f"wrong-method:{path}")(refuse) for path in handler.paths
    ]


@route("/{path:path}", http_method=ALL_METHODS)
async def unknown_route(request: Request[Any, Any, Any]) -> Response[bytes]:
    return await calls.not_found(request, _svc(request))


async def _only_canonical_paths(request: Request[Any, Any, Any]) -> Response[bytes] | None:
    """Before every handler: a path sent in another spelling is refused (calls.canonical_path)."""
    scope = request.scope
    raw = scope.get("raw_path")  # the ASGI server's bytes as sent, before percent-decoding
    if raw is None or calls.canonical_path(raw, scope["path"]):
        return None
    return await calls.noncanonical_path(request, _svc(request))


@get("/healthz")
async def healthz() -> Response[bytes]:
    """Alive: the process answers. Says nothing about the engine or the store."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ready: every model verified, every engine healthy, the audit store takes a
    write, and the rate-limit store answers (a gateway without it refuses every
    call that has limits: a load balancer should send those calls elsewhere).
    One answer serves every probe for a second (gateway/readiness.py)."""
    status, body = await _svc(request).readiness.answer()
    return Response(body, status_code=status, media_type="application/json")


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    # Litestar's own refusals (e.g. 405 on a known path) in OpenAI's shape.
    err = ErrorEnvelope(ErrorBody(str(exc.detail), "invalid_request_error", None, "http_error"))
    return Response(msgspec.json.encode(err), status_code=exc.status_code, media_type="application/json")


def _internal_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("unhandled_error", error=type(exc).__name__)
    return Response(InternalError("Internal gateway error.").body(), status_code=500, media_type="application/json")


def _on_sighup(callback: Callable[[], None]) -> None:
    """SIGHUP reloads the keyring, the audit signing key and the policy and re-verifies every model
    (where signals can be handled: the main thread)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError):
        log.warning("sighup.unavailable")


def create_app(settings: Settings, preverified: dict[str, Verification] | None = None) -> Litestar:
    """The app; `preverified` carries manifest checks already done for this boot (by `up`)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        svc = app.state.services = await Services.start(settings, preverified)
        # For requests the HTTP server refuses before they reach the app (gateway/http_protocol.py).
        app.state.refuse_unparsed = functools.partial(calls.refuse_unparsed, svc)
        _on_sighup(
            lambda: (
                svc.reload_keyring(),
                svc.reload_signer(),
                svc.spawn(svc.reload_policy("sighup")),
                svc.spawn(svc.integrity.verify_all("sighup")),
            )
        )
        log.info("gateway.started", deployments=sorted(svc.upstreams))
        # Everything made so far (modules, the app, settings, policy) lives as
        # long as the process: out of the collector's way, so a full collection
        # under load walks only the objects of calls in flight.
        gc.collect()
        gc.freeze()
        # A call leaves no cyclic garbage (measured: none collected over
        # published-benchmark and error-path loads), so the collector only
        # ever walks calls in flight for nothing: at the default thresholds a
        # 500/s load spent 7% of the gateway's time in it, in pauses of up to
        # 90 ms that every call in flight waits out. Run it rarely instead.
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            yield
        finally:
            await app.state.services.close()
            connection_limits.flush_all()
            log.info("gateway.stopped")

    handlers = [
        chat_completions,
        completions,
        models,
        healthz,
        readyz,
        admin_verify_models,
        audit_events,
        audit_event,
        audit_stats,
        audit_verify,
    ]
    return Litestar(
        route_handlers=[*handlers, *(w for h in handlers for w in _wrong_methods(h)), unknown_route],
        lifespan=[lifespan],
        before_request=_only_canonical_paths,
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
        # The gateway reads bodies itself, with its own limit and an audited 413.
        request_max_body_size=None,
        openapi_config=None,
        # Logging is configured once by gateway.logs (JSON); Litestar's default
        # config would replace that handler with its own plain-text one.
        logging_config=None,
        debug=False,
    )

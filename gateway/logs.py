"""Structured logs: JSON lines on stderr, a request id on every line of a call.

Handlers never log bodies, keys or prompt text; the fields they bind are ids,
routes, statuses and timings. Third-party loggers (uvicorn, alembic) go through
the same JSON renderer so an operator's log pipeline sees one format.
"""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=str)


def _json(event: object, **_: object) -> bytes:
    # msgspec instead of json.dumps: one line per call is on the hot path;
    # anything msgspec does not know is written as its str(). Bytes go
    # straight to the BytesLogger below, which writes line and newline in one
    # write(2) where PrintLogger makes two.
    return _encoder.encode(event)


def _json_text(event: object, **_: object) -> str:
    # logging.Formatter must return str; the same encoder, so a third-party
    # line and one of ours render every value the same way.
    return _encoder.encode(event).decode()


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
# Both chains turn exc_info into an "exception" field holding the traceback
# text; without it a third-party error (uvicorn's "Exception in ASGI
# application", asyncio's "Task exception was never retrieved") would keep only
# the repr of a traceback object.
_EXCEPTIONS = structlog.processors.format_exc_info


def configure(level: str = "info") -> None:
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, _EXCEPTIONS, structlog.processors.JSONRenderer(_json)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _EXCEPTIONS,
                structlog.processors.JSONRenderer(_json_text),
            ],
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # httpx writes every request's full URL at INFO (httpcore its steps at
    # DEBUG): an allow-listed image fetch would put a presigned URL's signature
    # in the log, where the audit itself keeps the URL without its query.
    # Their warnings and errors still come through.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))

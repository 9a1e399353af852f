"""Errors as types. Each one knows its HTTP status and its OpenAI error body.

`audit_reason` is what the audit trail records; it can be more precise than the
client-facing message (a revoked key and an unknown key look the same to the
caller, but not to the auditor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec


class ErrorBody(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True):
    error: ErrorBody


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, audit_reason: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.audit_reason = audit_reason or self.code or self.type

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code)))

    def headers(self) -> dict[str, str]:
        return {}


class InternalError(GatewayError):
    """What no stage of a call expected (a bug, a database error): the operator's log has the rest."""

    code = "internal_error"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthenticated(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, claimed_key_id: str | None = None, **kwargs: str | None):
        super().__init__(message, **kwargs)
        # The visible id of the key presented (never its secret), for the audit trail.
        self.claimed_key_id = claimed_key_id

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="bastion"'}


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: Sequence[str], **kwargs: str | None):
        super().__init__(message, **kwargs)
        self.allowed = tuple(allowed)

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allowed)}


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # What is left of the request may still be arriving: the connection cannot be reused.
        return {"connection": "close"}


class HeadTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class EngineError(GatewayError):
    """The engine answered, but not with anything usable (502)."""

    status = 502
    type = "api_error"
    code = "engine_error"


class EngineUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "engine_unavailable"


class KeyStoreUnavailable(GatewayError):
    """Keys cannot be looked up: nobody is let in."""

    status = 503
    type = "api_error"
    code = "auth_unavailable"


class ModelUnavailable(GatewayError):
    """The model exists but is not verified against its manifest (pending or failed)."""

    status = 503
    type = "api_error"
    code = "model_unavailable"


class TooManyConnections(GatewayError):
    """A connection over gateway.max_connections or max_connections_per_client (503)."""

    status = 503
    type = "api_error"
    code = "too_many_connections"

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


class AuditUnavailable(GatewayError):
    """The audit store cannot take the record: refuse rather than serve unaudited."""

    status = 503
    type = "api_error"
    code = "audit_unavailable"


class EngineTimeout(GatewayError):
    status = 504
    type = "api_error"
    code = "engine_timeout"


class PolicyDenied(GatewayError):
    """Policy does not allow this call (the rule that decided is in the audit record)."""

    status = 403
    type = "permission_error"
    code = "policy_denied"


class PolicyLimitExceeded(BadRequest):
    """An input or parameter over a limit the policy refuses rather than adjusts."""

    code = "policy_limit_exceeded"


class ContentDenied(BadRequest):
    """A content rule with action `deny` matched (which one is audited, never the text)."""

    code = "content_policy_violation"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        retry_after: float,
        limit_headers: dict[str, str],
        **kwargs: str | None,
    ):
        super().__init__(message, **kwargs)
        # OpenAI's error type names the limit reached: "requests" or "tokens".
        self.type = limit
        self.retry_after = retry_after
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        seconds = max(1, math.ceil(self.retry_after))
        return {
            **self.limit_headers,
            "retry-after": str(seconds),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after * 1000))),
        }


class LimiterDown(GatewayError):
    """The shared rate-limit store is unreachable: calls are refused, not let through unlimited."""

    status = 503
    type = "api_error"
    code = "rate_limiter_unavailable"

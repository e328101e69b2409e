"""Errors the gateway answers with, and how each maps to HTTP.

Every error a client can see is a ``GatewayError``; its body has the shape the
OpenAI SDKs parse: ``{"error": {"message", "type", "param", "code"}}``.

    GatewayError
    ├── BadRequest           400 invalid_request_error   (bad JSON, wrong types, missing model)
    ├── Unauthenticated      401 authentication_error    (no key, unknown key, expired key)
    ├── Forbidden            403 permission_error        (model, region, tool, MCP server)
    ├── NotFound             404 invalid_request_error   (unknown model, response, route)
    ├── RequestTimeout       408 invalid_request_error   (a body that stopped arriving)
    ├── PayloadTooLarge      413 invalid_request_error
    ├── UnsupportedMediaType 415 invalid_request_error   (a body type the route does not take)
    ├── UpgradeRequired      426 invalid_request_error   (a WebSocket where none is served)
    ├── RateLimited          429 rate_limit_error         (quota windows, spent budgets)
    ├── ClientClosed         499 (access log only)        (the client went away mid-request)
    ├── InternalError        500 server_error             (a bug of ours; generic message)
    ├── UpstreamUnavailable  502 upstream_error           (connect failure, bad upstream)
    ├── ServiceUnavailable   503 service_unavailable      (credential, state, audit sink)
    └── UpstreamTimeout      504 timeout_error
"""

from __future__ import annotations

import json
from collections.abc import Mapping


class GatewayError(Exception):
    """An error answered by the gateway itself, never by the upstream."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The OpenAI-shaped JSON error body."""
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": err}).encode()


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthenticated(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UpgradeRequired(GatewayError):
    """A WebSocket handshake where no socket is served: clients fall back to HTTP at once."""

    status = 426
    type = "invalid_request_error"
    code = "websocket_not_served"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ClientClosed(GatewayError):
    """The client disconnected before the gateway could answer (nginx's 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class InternalError(GatewayError):
    """An unexpected failure inside the gateway; the message never carries its details."""

    def __init__(self) -> None:
        super().__init__(
            "The gateway failed while handling this request; it has been logged with the "
            "request id. Retry, and report the x-request-id if it persists."
        )


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class CredentialError(ServiceUnavailable):
    code = "credential_unavailable"


class StateError(ServiceUnavailable):
    code = "state_unavailable"


class StateTimeout(StateError):
    """The state store did not answer within its timeout (silent, or read late)."""


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"

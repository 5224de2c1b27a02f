"""The errors the emulator answers with, shaped the way Google's APIs shaped them.

::

    Exception
    ├── ApiError      a Mirror API error:
    │                 {"error": {"code", "message", "errors", "status"}}
    └── OAuthError    a token endpoint error:
                      {"error": ..., "error_description": ...}

Handlers raise them; the app turns each into its JSON response.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "OUT_OF_RANGE",
    416: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_REASONS = {
    400: "badRequest",
    401: "authError",
    403: "forbidden",
    404: "notFound",
    405: "httpMethodNotAllowed",
    409: "conflict",
    412: "conditionNotMet",
    413: "uploadTooLarge",
    416: "requestedRangeNotSatisfiable",
    429: "rateLimitExceeded",
    500: "backendError",
    501: "notImplemented",
    503: "backendError",
    504: "deadlineExceeded",
}

JSON_MEDIA_TYPE = "application/json; charset=UTF-8"


def status_name(code: int) -> str:
    """Return Google's canonical status name for an HTTP status code."""
    if code in _STATUS_NAMES:
        return _STATUS_NAMES[code]

    return "UNKNOWN" if code >= 500 else "FAILED_PRECONDITION"


def default_reason(code: int) -> str:
    """Return the ``errors[].reason`` Google's APIs used for a status code."""
    return _REASONS.get(code, "backendError" if code >= 500 else "badRequest")


class ApiError(Exception):
    """A Mirror API error, answered in Google's error JSON shape."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        location: str | None = None,
        location_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or default_reason(code)
        self.location = location
        self.location_type = location_type
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        """Return the error body, as Google's APIs wrote it."""
        detail: dict[str, Any] = {
            "domain": "global",
            "reason": self.reason,
            "message": self.message,
        }
        if self.location is not None:
            detail["locationType"] = self.location_type or "parameter"
            detail["location"] = self.location

        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [detail],
                "status": status_name(self.code),
            }
        }

    def response(self) -> JSONResponse:
        """Return the error as an HTTP response."""
        return JSONResponse(
            self.to_json(),
            status_code=self.code,
            headers=self.headers,
            media_type=JSON_MEDIA_TYPE,
        )


class OAuthError(Exception):
    """A token endpoint error, answered in OAuth 2.0's error JSON shape."""

    def __init__(self, code: int, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.code = code
        self.error = error
        self.description = description

    def response(self) -> JSONResponse:
        """Return the error as an HTTP response."""
        return JSONResponse(
            {"error": self.error, "error_description": self.description},
            status_code=self.code,
            headers={"Cache-Control": "no-store"},
            media_type=JSON_MEDIA_TYPE,
        )


def bad_request(message: str, *, field: str | None = None) -> ApiError:
    """Return a 400 error about a request value."""
    reason = "invalid" if field is not None else "badRequest"

    return ApiError(400, message, reason=reason, location=field)


def required(field: str) -> ApiError:
    """Return a 400 error about a missing required value."""
    return ApiError(
        400, f"Required value {field!r} is missing.", reason="required", location=field
    )


def not_found(what: str, identifier: str) -> ApiError:
    """Return a 404 error about a resource the caller cannot see."""
    return ApiError(404, f"{what} {identifier!r} was not found.", reason="notFound")

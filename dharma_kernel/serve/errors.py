"""OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``, one exception for all."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error the client caused (or a full queue): its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def from_validation(error: ValidationError) -> APIError:
    """The first problem pydantic found, named by its field path (``messages.1.role``)."""
    first = error.errors()[0]
    # a union's member types appear in the path (``content.str``); the client only knows field names
    path = [str(p) for p in first["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)]
    param = ".".join(path) or None
    missing = first["type"] == "missing"
    message = f"'{param}' is required" if missing else f"'{param}': {first['msg']}"
    if first["type"] == "extra_forbidden":
        message = f"unknown field '{param}'"
    return APIError(
        400, message, param=param, code="missing_required_parameter" if missing else "invalid_type"
    )

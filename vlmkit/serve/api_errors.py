"""The errors a client is answered with: ``ApiError`` (an HTTP status, a message and OpenAI's error type
and code), the client-facing form of any exception (``api_error``), and the messages the server's router
and batch rows share (a body over the size limit, a method a route does not take)."""

import logging

from ..errors import InputError, MediaError, TemplateError, VlmkitError
from .responses import error_body
from .scheduler import JobCancelled, ServerBusy

log = logging.getLogger("vlmkit.serve")


class ApiError(Exception):
    """An error answered to the client: HTTP status, message, and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # an echoed lone surrogate
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)


def body_too_large(size: str, limit: int) -> ApiError:
    """The 413 for a request body over --max-body-bytes (``size`` is the byte count, or "over N")."""
    return ApiError(413, f"the request body is {size} bytes, more than this server's limit of {limit} bytes "
                         f"(--max-body-bytes); send smaller or fewer inline images, or image URLs",
                    code="request_too_large")



def method_not_allowed(method: str, allowed: str) -> str:
    """The message of a 405 (the server's router and batch rows alike)."""
    return f"method {method[:16]!r} is not allowed on this route; use {allowed or 'another method'}"


def api_error(err: BaseException) -> ApiError:
    """The client-facing form of any error: vlmkit's input, media and template errors are 400s with
    their own message; anything unexpected is a 500 that reveals nothing but its type."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ServerBusy):
        return ApiError(503, str(err), "server_error", "server_busy")
    if isinstance(err, JobCancelled):
        return ApiError(499, str(err), "invalid_request_error", "cancelled")
    if isinstance(err, (InputError, MediaError, TemplateError)):
        return ApiError(400, str(err))
    if isinstance(err, VlmkitError):
        return ApiError(400, str(err))
    log.error("internal error while serving a request", exc_info=err)
    return ApiError(500, f"internal server error ({type(err).__name__}); the server logged the details",
                    "server_error", "internal_error")

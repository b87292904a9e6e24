"""uvicorn as ``vlmkit serve`` runs it, with limits for slow or abusive clients.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps a request's headers
(h11's ``max_incomplete_event_size``), but waits forever for a client that sends its headers a byte at
a time. ``SlowClientProtocol`` closes a connection whose request headers have not all arrived within
``header_timeout_s``; the body has its own deadline in the app (``app._read_json``, a 408)."""

import asyncio
import errno
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import VlmkitError


class ServeStartError(VlmkitError):
    """``vlmkit serve`` cannot start as configured (the message names the flag to change)."""


class SlowClientProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (``header_timeout_s``)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._seen_cycle = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are in
            self._seen_cycle = self.cycle
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle is self._seen_cycle and
                                                self.cycle.response_complete):
            self.logger.info("closing a connection that sent no complete request headers in %ss",
                             self.header_timeout_s)
            self.transport.close()


class HeaderLimit:
    """ASGI middleware that answers 400 to a request whose headers hold more than ``limit`` bytes. h11's
    own cap (``max_incomplete_event_size``) only applies while headers are still arriving, so headers that
    come in one piece, or in pieces under the cap each, reach the app whatever their size."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            # each header line as sent: name, ": ", value, CRLF
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.limit:
                from fastapi.responses import JSONResponse

                from .api_errors import ApiError

                error = ApiError(400, f"the request's headers are {size} bytes, more than this server's limit of "
                                      f"{self.limit} bytes (--max-header-bytes)")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def uvicorn_config(app, config, **options):
    """The ``uvicorn.Config`` for ``app`` under a ``ServeConfig``: its address, slow-client limits and
    graceful shutdown (``options`` go to uvicorn as they are)."""
    import uvicorn

    protocol = type("SlowClientProtocol", (SlowClientProtocol,), {"header_timeout_s": config.header_timeout_s})
    options.setdefault("log_level", "info")
    return uvicorn.Config(app, host=config.host, port=config.port, http=protocol, **options,
                          timeout_keep_alive=config.keep_alive_s,
                          h11_max_incomplete_event_size=config.max_header_bytes,
                          timeout_graceful_shutdown=config.shutdown_timeout_s)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound to ``--host``/``--port`` before the model loads, and handed to uvicorn:
    a host this machine does not have or a port in use is one clear error at once, not uvicorn's
    message after loading has started (and a process that then exits while torch loads in another
    thread aborts). The family follows uvicorn's own rule (IPv6 when the host has a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
        sock.bind((host, port))
    except (OSError, UnicodeError, OverflowError) as err:
        sock.close()
        raise ServeStartError(_bind_problem(host, port, err)) from None
    sock.set_inheritable(True)
    return sock


def _bind_problem(host: str, port: int, err: Exception) -> str:
    code = getattr(err, "errno", None)
    if code == errno.EADDRINUSE:
        return f"--port {port} is already in use on {host} (another server?); stop it or give another --port"
    if code in (errno.EACCES, errno.EPERM):
        return f"--port {port} needs privileges on this machine (ports below 1024 usually do); give a --port of " \
               f"1024 or more"
    reason = getattr(err, "strerror", None) or str(err)
    return f"cannot listen on --host {host!r}: {reason}. Give an address of this machine: 127.0.0.1 (this " \
           f"machine only), 0.0.0.0 (every interface) or one of its IP addresses or host names"

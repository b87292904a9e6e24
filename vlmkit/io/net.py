"""vlmkit's HTTP(S) client for media URLs: every hop's resolved addresses checked against a
``MediaPolicy`` (private, loopback, link-local... refused unless allowed), sockets pinned to the checked
IPs against DNS rebinding, one wall-clock budget for the whole fetch, and a byte cap on the body."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import threading
import time
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

from vlmkit.errors import MediaError
from vlmkit.io.media_policy import MediaPolicy

_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def describe_source(source) -> str:
    """A media source as an error message names it: a path or URL (long ones cut), a data: URI as its header
    and length (its base64 says nothing to a reader, and can be megabytes long), anything else by its type."""
    text = os.fsdecode(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if isinstance(source, str) and text[:5].lower() == "data:":
        return f"{text.partition(',')[0][:60]},... ({len(text)} characters)"
    return text if len(text) <= 100 else text[:97] + "..."


def check_address(address: str, policy: MediaPolicy, host: str | None = None) -> None:
    """Raise `MediaError` if `policy` refuses connecting to the IP literal `address` (resolved from `host`).

    Unless private hosts are allowed or the host/IP/CIDR is in ``allowed_hosts``, anything not globally
    routable is refused (private, loopback, link-local, multicast, reserved, unspecified, CGNAT), also when
    embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64).
    """
    if policy.allow_private_hosts:
        return
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 scope id
    if _is_allowed(ip, host, policy.allowed_hosts):
        return
    if _is_internal(ip):
        name = f"host {host!r} resolves to " if host and host != address else ""
        raise MediaError(f"refused private or internal address: {name}{ip}")


def fetch_url(url: str, out: BinaryIO, policy: MediaPolicy) -> int:
    """Download an http(s) `url` into the binary file `out` under `policy`; return the bytes written.

    Redirects are followed here so every hop's scheme and resolved addresses are checked. Against DNS
    rebinding, the socket connects to the very IPs that were checked (TLS still verifies the host name).
    Environment proxies are not used. The stdlib gives DNS lookups themselves no timeout.
    """
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for hop in range(policy.max_redirects + 1):
        try:
            parts, host, port, ips = _checked_target(current, policy)
        except MediaError as e:
            if hop == 0:
                raise
            raise MediaError(f"redirect to a refused target {describe_source(current)} ({e}) from {describe_source(url)}") from e
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        pinned = _PinnedHTTPS if parts.scheme.lower() == "https" else _PinnedHTTP
        conn = pinned(host, port, ips, _remaining(deadline, policy, url))
        # a socket timeout bounds each read, not a status line or headers dripped a byte at a time: at the
        # deadline the watchdog shuts the connection, which ends whatever read is waiting
        watchdog = threading.Timer(_remaining(deadline, policy, url), conn.expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", path, headers={"User-Agent": "vlmkit", "Accept-Encoding": "identity"})
            sock = conn.sock  # held here: http.client drops conn.sock when the server will close
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise MediaError(f"HTTP {resp.status} redirect without a Location header: {describe_source(url)}")
                current = urljoin(current, location)
                continue
            if resp.status != 200:
                raise MediaError(f"HTTP error {resp.status} {resp.reason} fetching {describe_source(current)}")
            written = _read_capped(resp, sock, out, policy, deadline, current)
            if conn.expired:  # the body ended because the watchdog shut the connection
                raise TimeoutError
            return written
        except TimeoutError as e:  # socket.timeout is TimeoutError since 3.10
            raise MediaError(f"timed out after {policy.timeout_s}s fetching {describe_source(current)}") from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            if conn.expired:
                raise MediaError(f"timed out after {policy.timeout_s}s fetching {describe_source(current)}") from e
            raise MediaError(f"could not fetch {describe_source(current)}: {e}") from e
        finally:
            watchdog.cancel()
            conn.close()
    raise MediaError(f"too many redirects (more than {policy.max_redirects}) fetching {describe_source(url)}")


def _is_allowed(ip, host: str | None, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # not an IP or CIDR: a host name
            if host and entry.lower().rstrip(".") == host.lower().rstrip("."):
                return True
    return False


def _is_internal(ip) -> bool:
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _is_internal(embedded):
            return True
    return not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or (
        ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def _checked_target(url: str, policy: MediaPolicy):
    try:  # urlsplit checks a bracketed host: "http://[::1/x" or "http://[zz]/x" raise ValueError
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as e:
        raise MediaError(f"malformed URL {describe_source(url)} ({e}); an IPv6 host is written in brackets, "
                         f"as http://[2001:db8::1]/image.png") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme {scheme!r} (only http and https are fetched): {describe_source(url)}")
    if not host:
        raise MediaError(f"URL has no host: {describe_source(url)}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as e:
        raise MediaError(f"cannot resolve {describe_source(url)}: {e}") from e
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in ips:  # refuse if any answer is internal: a mixed answer is a rebinding tell
        check_address(ip, policy, host)
    return parts, host, port, ips


def _remaining(deadline: float, policy: MediaPolicy, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaError(f"timed out after {policy.timeout_s}s fetching {describe_source(url)}")
    return left


def _read_capped(resp, sock: socket.socket, out: BinaryIO, policy: MediaPolicy, deadline: float, url: str) -> int:
    length = (resp.getheader("Content-Length") or "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise MediaError(f"response too large: Content-Length {length} > max_bytes={policy.max_bytes}: {describe_source(url)}")
    total = 0
    while True:
        sock.settimeout(_remaining(deadline, policy, url))  # a slow drip cannot outlast the budget
        chunk = resp.read1(64 * 1024)
        if not chunk:
            return total
        total += len(chunk)
        if total > policy.max_bytes:
            raise MediaError(f"response too large: over max_bytes={policy.max_bytes}: {describe_source(url)}")
        out.write(chunk)


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the already-checked IPs, trying each in turn: the host name is never resolved again."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ips = ips
        self._connected: socket.socket | None = None  # the TCP socket, under any TLS layer
        self.expired = False

    def connect(self):
        for i, ip in enumerate(self._ips):
            try:
                self.sock = self._connected = socket.create_connection((ip, self.port), self.timeout)
                if self.expired:  # the deadline passed while connecting
                    self.expire()
                return
            except OSError:
                if i == len(self._ips) - 1:
                    raise

    def expire(self) -> None:
        """Called at the fetch's deadline (from another thread): shuts the connection down, so a read waiting
        on it returns at once, and marks the fetch as timed out."""
        self.expired = True
        if self._connected is not None:
            with contextlib.suppress(OSError):
                self._connected.shutdown(socket.SHUT_RDWR)


class _PinnedHTTPS(_PinnedHTTP, http.client.HTTPSConnection):
    """As _PinnedHTTP, over TLS: SNI and the certificate check use the host name, not the IP dialled."""

    def connect(self):
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)

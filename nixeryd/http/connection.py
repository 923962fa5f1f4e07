"""The HTTP side of a connection, below the registry API: the site, its requests and
its channel. What reaches ``api.py`` has passed through here.

- A TLS handshake on a plain-HTTP port is answered with an HTTP 400 at once.
- Request bodies are dropped as they arrive (no endpoint reads one).
- A request line or header block past the limits is answered 431, as Go's server
  (and so CNCF distribution) does, not dropped without a word.
- Statuses Twisted has no phrase for (429, 431) carry their names.
- A request's line and headers must arrive within ``HEADER_DEADLINE`` seconds, however
  slowly they trickle (a byte every 20 s kept the idle timeout from ever firing): past
  it, ``408`` and the connection closes. At most ``MAX_CONNECTIONS`` are open at once;
  one more is closed at once, so that held connections cannot take every descriptor.
"""
from __future__ import annotations

import io
from typing import Any

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from zope.interface import implementer

from nixeryd.ops.metrics import Metrics

IDLE_TIMEOUT = 60
HEADER_DEADLINE = 30
MAX_CONNECTIONS = 512
MAX_HEADER_BYTES = 16384
"""The request line and headers together, as Twisted's own default; each line too."""
PHRASES = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}
"""Reason phrases Twisted does not know."""
TLS_ON_PLAIN_PORT = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n400 Bad Request: this port speaks plain HTTP, not TLS\n"
)
_TOO_LARGE_BODY = b"431 Request Header Fields Too Large\n"
_TIMEOUT_BODY = b"408 Request Timeout: the request's headers took too long to arrive\n"
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
)


class RefuseTLS(ProtocolWrapper):
    """Answers a TLS handshake on a plain-HTTP port with an HTTP 400, at once.

    Clients told a registry is insecure (docker, containerd, skopeo, podman)
    try HTTPS first. Left waiting, they give up on the handshake only after 10
    seconds, for every operation. Closed without a word, Go's TLS client sees
    an EOF, which Docker and containerd take for a failure. An HTTP answer is
    what Go's TLS client reports as "first record does not look like a TLS
    handshake": the sign they fall back to plain HTTP on, as Go's own server
    and CNCF distribution give it.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[:1] == b"\x16" and self.transport is not None:  # a TLS record of type handshake
                self.transport.write(TLS_ON_PLAIN_PORT)
                self.transport.loseConnection()
                return
        super().dataReceived(data)


@implementer(IProtocolNegotiationFactory)
class PlainHTTPFactory(WrappingFactory):
    """What every endpoint listens with. Behind TLS (``ssl:``) it offers HTTP/1.1 by ALPN:
    Twisted's TLS picks the protocol from the factory it wraps, and a factory that names
    none answers every client offering ALPN (browsers, curl, Python) with an ``internal
    error`` alert."""

    protocol = RefuseTLS
    max_connections = MAX_CONNECTIONS

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.max_connections:
            return None  # closed at once: the connections held are bounded
        return super().buildProtocol(addr)


class _Discard(io.BytesIO):
    """A request body that is dropped as it arrives: no endpoint reads one, so
    an upload costs neither memory nor disk however large it is."""

    def write(self, data: Any) -> int:
        return len(data)


class RegistryRequest(Request):
    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        self.content = _Discard()

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        super().setResponseCode(code, message if message is not None else PHRASES.get(code))

    def finish(self) -> None:
        metrics: Metrics | None = getattr(getattr(self.channel, "site", None), "metrics", None)
        if metrics is not None and not self.finished:
            metrics.answered(self.path or b"", self.method or b"", int(self.code))
        super().finish()


class RegistryChannel(http.HTTPChannel):
    """An HTTP channel that answers over-long request lines and headers with 431."""

    MAX_LENGTH = MAX_HEADER_BYTES
    totalHeadersSize = MAX_HEADER_BYTES
    header_deadline = HEADER_DEADLINE
    _header_bytes = 0
    _in_body = False
    _deadline: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(self.header_deadline, self._too_slow)
        self._header_bytes += len(line)
        if self._header_bytes > self.totalHeadersSize:
            self._too_large()
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._header_bytes = 0
        self._stop_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.write(REQUEST_TIMEOUT)
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large()

    def _too_large(self) -> None:
        if self.transport is not None:
            self.transport.write(HEADERS_TOO_LARGE)
        self.loseConnection()


class RegistrySite(Site):
    protocol = RegistryChannel  # type: ignore[assignment]  # Twisted types it as a factory function
    metrics: Metrics | None = None
    access_log = True

    def log(self, request: http.Request) -> None:
        """One line per request in the log, unless the operator turned them off
        (``NIXERY_ACCESS_LOG``): a busy registry's log is mostly these, and each costs
        about a sixth of a warm pull's time; /metrics counts requests either way."""
        if self.access_log:
            super().log(request)


def make_site(resource: IResource, metrics: Metrics | None = None, access_log: bool = True) -> Site:
    """The site every listening endpoint serves (wrapped in ``PlainHTTPFactory``).
    Idle connections (slow or stalled clients) are dropped after a minute."""
    site = RegistrySite(resource, timeout=IDLE_TIMEOUT)
    site.metrics = metrics
    site.access_log = access_log
    site.requestFactory = RegistryRequest
    site.displayTracebacks = False
    return site

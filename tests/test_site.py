"""Limits that hold under slow and many clients, below the registry API."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from nixeryd.http.connection import HEADER_DEADLINE, PlainHTTPFactory, make_site


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"hello"


ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class SlowClientTests(SynchronousTestCase):
    def connect(self, clock: Clock) -> tuple[object, StringTransport]:
        site = make_site(Hello())
        protocol = site.buildProtocol(ADDRESS)
        protocol.callLater = clock.callLater  # type: ignore[attr-defined]
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_headers_trickling_in_are_cut_off(self) -> None:
        """A client sending a byte of its headers every 20 s (each resetting the idle
        timeout) is answered 408 and closed once the header deadline passes."""
        clock = Clock()
        protocol, transport = self.connect(clock)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")  # type: ignore[attr-defined]
        for _ in range(int(HEADER_DEADLINE / 20)):
            clock.advance(20)
            protocol.dataReceived(b"X-Slow: a\r\n")  # type: ignore[attr-defined]
        self.assertFalse(transport.disconnecting)
        clock.advance(HEADER_DEADLINE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout"))
        self.assertTrue(transport.disconnecting)

    def test_a_prompt_request_is_answered_and_leaves_no_timer(self) -> None:
        clock = Clock()
        protocol, transport = self.connect(clock)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
        self.assertIn(b"hello", transport.value())
        clock.advance(HEADER_DEADLINE * 2)
        self.assertNotIn(b"408", transport.value())


class ConnectionLimitTests(SynchronousTestCase):
    def test_connections_past_the_limit_are_closed(self) -> None:
        """Past the bound, a new connection gets no protocol (Twisted closes it at once);
        when one closes, another is taken."""
        factory = PlainHTTPFactory(make_site(Hello()))
        factory.max_connections = 2
        held = []
        for _ in range(2):
            protocol = factory.buildProtocol(ADDRESS)
            assert protocol is not None
            protocol.makeConnection(StringTransport())
            held.append(protocol)
        self.assertIsNone(factory.buildProtocol(ADDRESS))
        held[0].connectionLost(None)
        self.assertIsNotNone(factory.buildProtocol(ADDRESS))

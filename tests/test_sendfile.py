"""The sendfile producer when the client goes away, driven the way Twisted drives it.

The request here is a stand-in for ``twisted.web.http.Request`` holding only what the
producer touches, with Request's own disconnect behaviour copied: on connection loss
``channel`` becomes None and ``unregisterProducer`` goes through the channel. The socket
is real (a socketpair), so sendfile(2) really runs.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from nixeryd.http.sendfile import SendfileProducer


class Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = False

    def getHandle(self) -> socket.socket:
        return self.sock

    def loseConnection(self) -> None:
        self.lost = True


class Channel:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class Request:
    """What SendfileProducer uses of twisted.web.http.Request, behaving as it does."""

    def __init__(self, channel: Channel) -> None:
        self.channel: Channel | None = channel
        self.producer: Any = None
        self.finished = False
        self.sentLength = 0
        self.written = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        assert self.channel is not None
        self.channel.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.channel.unregisterProducer()  # type: ignore[union-attr]  # as Twisted: fails after a disconnect
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.sentLength += len(data)

    def connectionLost(self) -> None:
        self.channel = None


def blob(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(size))
    return path


def test_the_client_leaving_mid_blob_ends_the_producer_quietly(tmp_path: Path) -> None:
    """After the connection is lost (channel gone), stopping and resuming the producer raise
    nothing, and it reports the body done."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        request = Request(Channel(Transport(ours)))
        producer = SendfileProducer(request, str(blob(tmp_path, 3 * 1024 * 1024)), 3 * 1024 * 1024)
        done = producer.start()
        assert request.written == 1024 * 1024 and not done.called
        request.connectionLost()
        producer.resumeProducing()
        producer.stopProducing()
        assert done.called


def test_sent_bytes_are_counted_for_the_access_log(tmp_path: Path) -> None:
    """Bytes sendfile moves count in the request's sentLength, as written bytes do."""
    size = 2 * 1024 * 1024 + 5
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
        request = Request(Channel(Transport(ours)))
        producer = SendfileProducer(request, str(blob(tmp_path, size)), size)
        done = producer.start()
        producer.resumeProducing()  # the ordinary chunk is out: sendfile the rest
        assert done.called
        assert request.sentLength == size

"""Sending a stored blob with ``sendfile(2)``: the kernel moves file pages to the
socket, and the bytes never pass through Python.

The producer is a push producer on the request. ``HTTPChannel`` promises that
a push producer's ``resumeProducing`` is called only when the transport's write
buffer has emptied; so each round writes one ordinary chunk (larger than the
transport's buffer, which pauses us), and when we are resumed the buffer is
empty: whatever ``sendfile`` then writes cannot overtake queued bytes. When the
socket is full (EAGAIN) the next round starts with an ordinary chunk again.

Used for whole-blob GETs on plain sockets; ranges, HEAD and TLS go through
``twisted.web.static.File``.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

# Larger than a transport's write buffer (64 KiB), so that writing it pauses us.
ORDINARY_CHUNK = 1024 * 1024
SENDFILE_CHUNK = 64 * 1024 * 1024


def can_sendfile(request: Any) -> bool:
    """Whether the request came over a plain socket that sendfile can write to."""
    if request.isSecure() or not hasattr(os, "sendfile") or request.channel is None:
        return False
    try:
        return int(request.channel.transport.getHandle().fileno()) >= 0
    except (AttributeError, OSError):
        return False


@implementer(IPushProducer)
class SendfileProducer:
    """Writes the ``size`` bytes of the file at ``path`` as the request's body."""

    def __init__(self, request: Any, path: str, size: int) -> None:
        self._request = request
        # Taken now: once the client is gone the request's channel is None, and the
        # producer may still be called (stopProducing, a last resume).
        self._transport = request.channel.transport
        self._file = open(path, "rb")
        self._size = size
        self._offset = 0
        self._waiting = False  # an ordinary chunk is queued; resumed means it is out
        self.done: Deferred[bytes] = Deferred()

    def start(self) -> Deferred[bytes]:
        self._request.registerProducer(self, True)
        self._ordinary()
        return self.done

    def pauseProducing(self) -> None:
        pass  # nothing runs between rounds; resumeProducing starts the next

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if not self._waiting:
            self._ordinary()
            return
        self._waiting = False
        try:
            socket_fd = self._transport.getHandle().fileno()
            while self._offset < self._size:
                sent = os.sendfile(socket_fd, self._file.fileno(), self._offset,
                                   min(SENDFILE_CHUNK, self._size - self._offset))
                if sent == 0:
                    raise OSError("the blob is shorter than its size")
                self._offset += sent
                # Bytes sendfile moves never pass request.write: count them for the access log.
                self._request.sentLength += sent
        except BlockingIOError:
            self._ordinary()
            return
        except OSError as e:
            log.warn("sending a blob failed: {error}", error=str(e))
            self._end()
            self._transport.loseConnection()
            return
        self._end()

    def stopProducing(self) -> None:
        self._end()

    def _ordinary(self) -> None:
        """Write the next chunk the ordinary way; ends the body when it was the last."""
        self._file.seek(self._offset)
        chunk = self._file.read(min(ORDINARY_CHUNK, self._size - self._offset))
        if not chunk:
            log.warn("a blob is shorter than its size")
            self._end()
            self._transport.loseConnection()
            return
        self._offset += len(chunk)
        self._waiting = True
        self._request.write(chunk)
        if self._offset >= self._size:
            self._end()

    def _end(self) -> None:
        if self.done.called:
            return
        self._file.close()
        if self._request.producer is self and not self._request.finished and \
                self._request.channel is not None:
            self._request.unregisterProducer()
        self.done.callback(b"")

"""Layer compression on every core, in bytes that never depend on the number of cores.

gzip: the tar stream is cut into ``BLOCK``-sized blocks, each deflated on its own (in a
thread: zlib-ng releases the GIL while it compresses) with the ``WINDOW`` bytes before it
as its dictionary, as pigz does, and flushed to a byte boundary, so that the blocks'
outputs joined are one deflate stream. The block size is fixed and every block is primed
the same way, so one worker and sixty-four give the same bytes, and so the same digests.

zstd: zstd's own worker threads, whose output is the same for any number of workers of
one or more (and whatever the sizes the stream is handed in).
"""
from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from zlib_ng import zlib_ng

BLOCK = 128 * 1024
"""Bytes of tar deflated as one block: pigz's default, small enough to keep every core
busy on a layer of a few MB, large enough that priming costs almost no ratio."""
WINDOW = 32 * 1024
"""The dictionary each block is primed with: the deflate window."""


class Compressor(Protocol):
    def compress(self, data: bytes | memoryview) -> bytes:
        """Compressed bytes for ``data``, as far as they are ready."""

    def flush(self) -> bytes:
        """The rest of the stream, ended."""

    def close(self) -> None:
        """Let go of the workers, whether or not the stream was ended."""


def _deflate(block: bytes, window: bytes, level: int, last: bool) -> bytes:
    if window:
        compressor = zlib_ng.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY, window)
    else:
        compressor = zlib_ng.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
    return compressor.compress(block) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelDeflate:
    """A raw deflate stream compressed ``BLOCK`` by ``BLOCK`` on ``workers`` threads (on
    the calling thread alone for one). At most a few blocks per worker are held at once."""

    def __init__(self, level: int, workers: int) -> None:
        self._level = level
        self._workers = workers
        # Started with the stream's second block: a layer of one block (most of an image's
        # small layers) is deflated on the calling thread, with no threads to start.
        self._pool: ThreadPoolExecutor | None = None
        self._most = 2 * workers + 2
        self._pending: deque[Future[bytes]] = deque()
        self._buffer = bytearray()
        self._window = b""

    def compress(self, data: bytes | memoryview) -> bytes:
        view = memoryview(data).cast("B")
        ready: list[bytes] = []
        if self._buffer:
            taken = BLOCK - len(self._buffer)
            self._buffer += view[:taken]
            view = view[taken:]
            if len(self._buffer) < BLOCK:
                return b""
            ready.append(self._submit(bytes(self._buffer), last=False))
            self._buffer.clear()
        while len(view) >= BLOCK:
            ready.append(self._submit(bytes(view[:BLOCK]), last=False))
            view = view[BLOCK:]
        self._buffer += view
        return b"".join(ready)

    def flush(self) -> bytes:
        try:
            ready = [self._submit(bytes(self._buffer), last=True)]
            self._buffer.clear()
            while self._pending:
                ready.append(self._pending.popleft().result())
            return b"".join(ready)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (after a failure too); nothing more can be compressed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, block: bytes, last: bool) -> bytes:
        """Hand a block to a worker; the outputs of the blocks done, in order."""
        window = self._window
        self._window = block[-WINDOW:] if len(block) >= WINDOW else (window + block)[-WINDOW:]
        if self._pool is None and self._workers > 1 and not (last and not self._pending):
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="nixeryd-deflate")
        if self._pool is None:
            return _deflate(block, window, self._level, last)
        self._pending.append(self._pool.submit(_deflate, block, window, self._level, last))
        done = []
        while self._pending and (self._pending[0].done() or len(self._pending) > self._most):
            done.append(self._pending.popleft().result())
        return b"".join(done)


class ZstdStream:
    """A zstd frame with a checksum and no content size, compressed by zstd's workers."""

    def __init__(self, level: int, workers: int) -> None:
        import zstandard

        self._compressor = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=False, threads=max(workers, 1)
        ).compressobj()

    def compress(self, data: bytes | memoryview) -> bytes:
        out: bytes = self._compressor.compress(data)
        return out

    def flush(self) -> bytes:
        out: bytes = self._compressor.flush()
        return out

    def close(self) -> None:
        pass  # zstd's workers go with the compressor

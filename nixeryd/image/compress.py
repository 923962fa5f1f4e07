"""Layer compression on every core, in bytes that never depend on the number of cores.

gzip: the tar stream is cut into ``BLOCK``-sized blocks, and each is compressed on its own
(in a thread: libdeflate lets go of the GIL) as a gzip member of its own; the members one
after another are the layer. RFC 1952 makes a gzip file a series of members, and every
gzip reader a registry client uses (Go's, pgzip, zlib's gzip tools, Python's) reads them
all, as eStargz layers rely on. libdeflate compresses a whole block at once, about 1.35
times zlib-ng's speed at level 6 with a ratio as good as zlib's own (which zlib-ng's is
not), at the cost of a window that starts afresh every block: at ``BLOCK`` that costs
less than the better matching gains. The block size is fixed, so one worker and sixty-four
give the same bytes, and so the same digests.

zstd: zstd's own worker threads, whose output is the same for any number of workers of
one or more (and whatever the sizes the stream is handed in).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol

import deflate

BLOCK = 256 * 1024
"""Bytes of tar in one gzip member: small enough to keep every core busy on a layer of a
few MB, large enough that a window started afresh costs almost no ratio (0.5% at 128 KiB,
0.1% at 256 KiB against one stream) and the 18 bytes of each member's header and trailer
nothing."""


class Compressor(Protocol):
    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        """Compressed bytes for ``data``, as far as they are ready."""

    def flush(self) -> bytes:
        """The rest of the stream, ended."""

    def close(self) -> None:
        """Let go of the workers, whether or not the stream was ended."""


def _member(block: bytes, level: int) -> bytearray:
    return deflate.gzip_compress(block, level)


class GzipMembers:
    """A gzip stream compressed ``BLOCK`` by ``BLOCK`` into members on ``workers`` threads
    (on the calling thread alone for one, and, with ``share``, whenever ``share()`` says the
    cores are wanted elsewhere). At most a few blocks per worker are held at once. Each
    member's header is libdeflate's: no name, mtime 0, OS unknown."""

    def __init__(self, level: int, workers: int, share: Callable[[], bool] | None = None) -> None:
        self._level = level
        self._workers = workers
        self._share = share
        # Started with the stream's second block: a layer of one block (most of an image's
        # small layers) is compressed on the calling thread, with no threads to start.
        self._pool: ThreadPoolExecutor | None = None
        self._most = 2 * workers + 2
        self._pending: deque[Future[bytearray]] = deque()
        self._buffer = bytearray()
        self._members = 0

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        view = memoryview(data).cast("B")
        ready: list[bytearray] = []
        if self._buffer:
            taken = BLOCK - len(self._buffer)
            self._buffer += view[:taken]
            view = view[taken:]
            if len(self._buffer) < BLOCK:
                return b""
            self._submit(bytes(self._buffer), ready, last=False)
            self._buffer.clear()
        while len(view) >= BLOCK:
            self._submit(bytes(view[:BLOCK]), ready, last=False)
            view = view[BLOCK:]
        self._buffer += view
        return b"".join(ready)

    def flush(self) -> bytes:
        try:
            ready: list[bytearray] = []
            # An empty stream is one empty member; otherwise no member is empty.
            if self._buffer or not self._members:
                self._submit(bytes(self._buffer), ready, last=True)
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

    def _submit(self, block: bytes, ready: list[bytearray], last: bool) -> None:
        """Hand a block to a worker; add to ``ready`` the members done, in order."""
        self._members += 1
        if self._share is not None and self._share():
            # Compressed here, after the members handed out before it.
            while self._pending:
                ready.append(self._pending.popleft().result())
            ready.append(_member(block, self._level))
            return
        if self._pool is None and self._workers > 1 and not (last and not self._pending):
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="nixeryd-deflate")
        if self._pool is None:
            ready.append(_member(block, self._level))
            return
        self._pending.append(self._pool.submit(_member, block, self._level))
        while self._pending and (self._pending[0].done() or len(self._pending) > self._most):
            ready.append(self._pending.popleft().result())


ZSTD_DEFAULT = {"strategy": 1, "window_log": 22, "hash_log": 17, "job_size": 8 << 20, "overlap_log": 9}
"""zstd's parameters for layers, where no level is asked for: zstd's level 2 (its fast
strategy) with the window and hash table of a wider level, a 4 MiB window (half of what
zstd recommends every decoder take), compressed 8 MiB a worker, each job primed with the
whole window before it. On layers of Nix store paths this packs as tight as zstd's level
3 (and tighter than the zstd command's level 3 on tar's own order), in three quarters of
its CPU, and in the memory level 3 takes (about 60 MB beside the tar's reading)."""


class ZstdStream:
    """A zstd frame with a checksum and no content size, compressed by zstd's workers;
    at ``level`` if given, else with ``ZSTD_DEFAULT``."""

    def __init__(self, level: int | None, workers: int) -> None:
        import zstandard

        if level is None:
            parameters = zstandard.ZstdCompressionParameters.from_level(
                2, threads=max(workers, 1), write_checksum=1, write_content_size=0, **ZSTD_DEFAULT)
        else:
            parameters = zstandard.ZstdCompressionParameters.from_level(
                level, threads=max(workers, 1), write_checksum=1, write_content_size=0)
        self._compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        out: bytes = self._compressor.compress(data)
        return out

    def flush(self) -> bytes:
        out: bytes = self._compressor.flush()
        return out

    def close(self) -> None:
        pass  # zstd's workers go with the compressor

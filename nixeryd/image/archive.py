"""Deterministic layer archives, hashed while written. Blocking: run in a thread.

Every archive is a PAX tar, gzip-compressed, with entries sorted bytewise by
path, owner 0:0 without names, mtime 1 (as in the Nix store), and gzip headers
without a file name and with mtime 0: the same input gives the same bytes on
every machine. The digest (sha256 of the compressed stream), the diffID (sha256
of the tar) and the size and MD5 of the compressed stream are computed while
the stream is written, in one pass and in constant memory.

Only regular files, symlinks and directories can be archived; anything else
(devices, FIFOs, sockets) raises ``ValueError`` naming the path, since a Nix
store path never holds one. Hard links are archived as regular files.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterable, Sequence

from nixeryd.core.blobs import BlobInfo
from nixeryd.image.compress import Compressor, GzipMembers, ZstdStream
from nixeryd.image.entries import Data, Dir, Entry, File, streamed_entries

CHUNK = 1024 * 1024
GATHER = 64 * 1024
MTIME = 1
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


# --- the hashed gzip stream ------------------------------------------------------


PACK_FORMAT = 3
"""Raised whenever the bytes a layer is written as change for the same files (2: gzip
block by block, zstd with workers; 3: gzip a member a block, by libdeflate), so that layer
records of the old bytes are not reused beside new ones."""
COMPRESSIONS = ("gzip", "zstd")
GZIP_LEVEL = 6
"""gzip's level where none is asked for; zstd's parameters are ``compress.ZSTD_DEFAULT``."""


class _HashedStream:
    """A compressed stream (gzip or zstd) written to ``out``, hashing both sides as it goes."""

    def __init__(self, out: BinaryIO, level: int | None, compression: str = "gzip", workers: int = 1,
                 md5: bool = True, share: Callable[[], bool] | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self._gzip = compression == "gzip"
        self._out = out
        self._tar_sha = hashlib.sha256()
        self._tar_size = 0
        self._gathered = bytearray()
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5() if md5 else None
        self._size = 0
        self._compressor: Compressor
        # zstd's workers outrun the thread assembling the tar: the compressed side is hashed
        # and written on a thread of its own (hashlib lets go of the GIL), in order. Deflate
        # keeps every core busy itself, and another thread there only competes for them.
        self._behind: ThreadPoolExecutor | None = None
        self._written: deque[Future[None]] = deque()
        if not self._gzip and workers > 1:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix="nixeryd-hash")
        if self._gzip:
            level = GZIP_LEVEL if level is None else level
            if not 0 <= level <= 9:
                raise ValueError(f"gzip level must be within 0..9, got {level}")
            # libdeflate, block by block on every core. Its output is part of every layer's
            # digest, so its version is pinned.
            self._compressor = GzipMembers(level, workers, share)
        else:
            if level is not None and not 1 <= level <= 19:
                raise ValueError(f"zstd level must be within 1..19, got {level}")
            self._compressor = ZstdStream(level, workers)

    def close(self) -> None:
        self._compressor.close()
        if self._behind is not None:
            self._behind.shutdown(wait=True, cancel_futures=True)

    @property
    def tar_size(self) -> int:
        return self._tar_size

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._size += len(data)
        if self._behind is None:
            self._output(data)
            return
        self._written.append(self._behind.submit(self._output, data))
        while self._written and (self._written[0].done() or len(self._written) > 8):
            self._written.popleft().result()

    def _output(self, data: bytes) -> None:
        self._sha.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self._out.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add uncompressed tar bytes to the stream. Headers and small files are gathered
        and hashed and compressed ``GATHER`` at a time: a store path's thousands of small
        files cost a call of each apiece otherwise."""
        size = len(data)
        self._tar_size += size
        if size < GATHER:
            self._gathered += data
            if len(self._gathered) < GATHER:
                return
            data = self._gathered
        elif self._gathered:
            self._push(self._gathered)
        self._push(data)

    def _push(self, data: bytes | bytearray | memoryview) -> None:
        self._tar_sha.update(data)
        self._emit(self._compressor.compress(data))
        if data is self._gathered:
            self._gathered.clear()

    def finish(self) -> BlobInfo:
        """End the stream and say what was written."""
        if self._gathered:
            self._push(self._gathered)
        self._emit(self._compressor.flush())
        while self._written:
            self._written.popleft().result()
        return BlobInfo(
            digest="sha256:" + self._sha.hexdigest(),
            diff_id="sha256:" + self._tar_sha.hexdigest(),
            size=self._size,
            md5=None if self._md5 is None else self._md5.hexdigest(),
        )


_NUL = b"\0"
_USTAR_TAIL = b"ustar\x0000" + _NUL * (32 + 32 + 8 + 8 + 155 + 12)
"""After the link name: the magic and version, empty user and group names, device
numbers (empty, as for any file but a device) and prefix, and the block's padding."""
_FIXED_SUM = sum(_USTAR_TAIL) + 8 * ord(" ")


def _header(entry: Entry) -> bytes:
    """The tar header of ``entry``: a ustar block, behind a pax header where a name or
    size does not fit one. Made here for the common case (Python's tarfile takes about
    fifty microseconds a header, a whole second for a large closure), byte for byte what
    tarfile writes otherwise; the bytes are part of every layer's digest, and making
    them here also keeps them from changing with Python's version."""
    if isinstance(entry, Dir):
        name = entry.name if entry.name.endswith("/") else entry.name + "/"
        kind, mode, owner, size, target = b"5", entry.mode, entry.owner, 0, ""
    elif isinstance(entry, File):
        name, kind, mode, owner, size, target = entry.name, b"0", entry.mode, 0, entry.size, ""
    elif isinstance(entry, Data):
        name, kind, mode, owner, size, target = entry.name, b"0", entry.mode, 0, len(entry.data), ""
    else:
        name, kind, mode, owner, size, target = entry.name, b"2", 0o777, 0, 0, entry.target
    if not (name.isascii() and target.isascii() and size < 8**11 and owner < 8**7
            and name.endswith("/") == (kind == b"5")):
        return _tarfile_header(entry)
    encoded, link = name.encode(), target.encode()
    block = _ustar(encoded[:100], mode, owner, size, MTIME, kind, link[:100])
    if len(encoded) <= 100 and len(link) <= 100:
        return block
    # A name or link too long for ustar: in a pax header before it, the block keeping
    # their first hundred bytes.
    records = (_pax_record(b"path", encoded) if len(encoded) > 100 else b"") + (
        _pax_record(b"linkpath", link) if len(link) > 100 else b"")
    pax = _ustar(b"././@PaxHeader", 0, 0, len(records), 0, b"x", b"")
    return b"".join((pax, records, bytes(-len(records) % _BLOCK), block))


def _ustar(name: bytes, mode: int, owner: int, size: int, mtime: int, kind: bytes, link: bytes) -> bytes:
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode & 0o7777, owner, owner, size, mtime)
    # The checksum is the sum of the block's bytes, its own field counted as spaces.
    checksum = _FIXED_SUM + sum(name) + sum(numbers) + kind[0] + sum(link)
    return b"".join((name.ljust(100, _NUL), numbers, b"%06o\0 " % checksum, kind,
                     link.ljust(100, _NUL), _USTAR_TAIL))


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"<length> <keyword>=<value>\\n"``, the length counting its own digits."""
    rest = len(keyword) + len(value) + 3
    length = rest + 1
    while length != rest + len(str(length)):
        length = rest + len(str(length))
    return b"%d %s=%s\n" % (length, keyword, value)


def _tarfile_header(entry: Entry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if isinstance(entry, Dir):
        info.type = tarfile.DIRTYPE
        info.mode = entry.mode
        info.uid = info.gid = entry.owner
    elif isinstance(entry, Data):
        info.type = tarfile.REGTYPE
        info.mode = entry.mode
        info.size = len(entry.data)
    elif isinstance(entry, File):
        info.type = tarfile.REGTYPE
        info.mode = entry.mode
        info.size = entry.size
    else:
        info.type = tarfile.SYMTYPE
        info.mode = 0o777
        info.linkname = entry.target
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _copy_file(entry: File, stream: _HashedStream, view: memoryview) -> None:
    """Copy a file's bytes through ``view`` (one buffer for every file of a layer: store
    paths hold thousands of small files, and a buffer apiece is a map and unmap each).
    Each read asks for one byte more than is left, so that a file of the size it was
    listed with is read, and known not to have grown, in one call."""
    remaining = entry.size
    with open(entry.source, "rb", buffering=0) as f:
        while True:
            wanted = min(CHUNK, remaining + 1)
            n = f.readinto(view[:wanted])
            if n > remaining:
                raise ValueError(f"{entry.source} grew while it was archived")
            if n:
                stream.write(view[:n])
                remaining -= n
            elif remaining:
                raise ValueError(f"{entry.source} shrank while it was archived")
            if not remaining and n < wanted:
                break  # a short read of a regular file is its end
    padding = -entry.size % _BLOCK
    if padding:
        stream.write(bytes(padding))


class _Packing:
    """How many layers this process is packing; taken with ``with``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.layers = 0

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def shared(self) -> bool:
        """Whether other layers are being packed too."""
        return self.layers > 1


_packing = _Packing()
"""A layer packed alone compresses on every core; layers packed side by side (an image's,
or two images') compress each on its own thread, for as long as they are side by side:
they keep the cores busy between them, and compression workers on top would leave the
assembling threads, which hold the GIL most of their time, to starve the reactor's."""


def write_entries(
    entries: Iterable[Entry], out: BinaryIO, level: int | None, compression: str, workers: int | None = None,
    md5: bool = True,
) -> BlobInfo:
    share: Callable[[], bool] | None = None
    if workers is None:
        # gzip asks block by block (a big layer whose neighbours are done takes every core
        # again); zstd's workers are set for the whole stream.
        share = _packing.shared
        workers = (os.cpu_count() or 1) if _packing.layers == 0 or compression == "gzip" else 1
    stream = _HashedStream(out, level, compression, workers, md5, share)
    view = memoryview(bytearray(CHUNK))
    with _packing:
        _packing.layers += 1
    try:
        for entry in entries:
            stream.write(_header(entry))
            if isinstance(entry, File):
                _copy_file(entry, stream, view)
            elif isinstance(entry, Data):
                stream.write(entry.data + bytes(-len(entry.data) % _BLOCK))
        stream.write(bytes(2 * _BLOCK))  # end-of-archive marker
        padding = -stream.tar_size % _RECORD
        if padding:
            stream.write(bytes(padding))
        return stream.finish()
    finally:
        with _packing:
            _packing.layers -= 1
        stream.close()


# --- public ----------------------------------------------------------------------


def write_layer(
    paths: Sequence[str], out: BinaryIO, *, level: int | None = None, compression: str = "gzip",
    workers: int | None = None, md5: bool = True,
) -> BlobInfo:
    """Write one deterministic tar.gz of ``paths`` (absolute local paths) to ``out``.

    Each path is archived under its absolute name without the leading "/"
    (``nix/store/<hash>-foo/bin/foo``), after directory entries for its parents
    (``nix/``, ``nix/store/``, mode 0o555). Modes of files and directories are
    kept as on disk. It is compressed on ``workers`` threads (when not given: every core
    while it is the only layer packing, its own thread while others are); the bytes are
    the same for any number. The MD5 of what is written is left out (None)
    unless ``md5``.
    """
    return write_entries(streamed_entries(paths, _walker()), out, level, compression, workers, md5)


_walkers: list[ThreadPoolExecutor] = []


def _walker() -> ThreadPoolExecutor:
    """The threads that list layers' paths, started once for the process (a pool a layer
    costs a thread's start and end, which is most of a small layer's time)."""
    with _packing:
        if not _walkers:
            _walkers.append(ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="nixeryd-walk"))
        return _walkers[0]

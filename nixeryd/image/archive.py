"""Deterministic layer archives, hashed while written. Blocking: run in a thread.

Every archive is a PAX tar, gzip-compressed, with entries sorted bytewise by
path, owner 0:0 without names, mtime 1 (as in the Nix store), and a gzip header
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
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Mapping, Sequence, Union

from zlib_ng import zlib_ng

from nixeryd.core.blobs import BlobInfo

CHUNK = 1024 * 1024
MTIME = 1
PARENT_DIR_MODE = 0o555
SYMLINK_LAYER_DIR_MODE = 0o755
TMP_MODE = 0o1777
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


# --- entries -------------------------------------------------------------------


@dataclass(frozen=True)
class _Dir:
    name: str  # without leading or trailing "/"
    mode: int
    owner: int = 0  # uid and gid alike


@dataclass(frozen=True)
class _Data:
    """A small regular file whose bytes nixeryd makes (/etc/passwd and the like)."""

    name: str
    mode: int
    data: bytes


@dataclass(frozen=True)
class _File:
    name: str
    mode: int
    size: int
    source: str  # absolute path on the local disk


@dataclass(frozen=True)
class _Symlink:
    name: str
    target: str


_Entry = Union[_Dir, _File, _Symlink, _Data]


def _sort_key(entry: _Entry) -> bytes:
    return os.fsencode(entry.name)


def _entry_for(path: str, name: str) -> _Entry:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return _Dir(name, stat.S_IMODE(st.st_mode))
    if stat.S_ISREG(st.st_mode):
        return _File(name, stat.S_IMODE(st.st_mode), st.st_size, path)
    if stat.S_ISLNK(st.st_mode):
        return _Symlink(name, os.readlink(path))
    raise ValueError(
        f"cannot archive {path}: only regular files, symlinks and directories are allowed"
    )


def _walk(top: str) -> Iterable[_Entry]:
    """Every entry at and below ``top`` (not following symlinks), named without the leading "/"."""
    stack = [top]
    while stack:
        path = stack.pop()
        entry = _entry_for(path, path.lstrip("/"))
        yield entry
        if isinstance(entry, _Dir):
            with os.scandir(path) as it:
                stack.extend(os.path.join(path, child.name) for child in it)


def _layer_entries(paths: Sequence[str]) -> list[_Entry]:
    entries: dict[str, _Entry] = {}
    for path in paths:
        if not os.path.isabs(path):
            raise ValueError(f"layer paths must be absolute, got {path!r}")
        path = os.path.normpath(path)
        if path == "/":
            raise ValueError("cannot archive the root directory")
        parent = os.path.dirname(path)
        while parent != "/":
            entries.setdefault(parent.lstrip("/"), _Dir(parent.lstrip("/"), PARENT_DIR_MODE))
            parent = os.path.dirname(parent)
        for entry in _walk(path):
            entries[entry.name] = entry
    return sorted(entries.values(), key=_sort_key)


# --- the hashed gzip stream ------------------------------------------------------


COMPRESSIONS = ("gzip", "zstd")
DEFAULT_LEVELS = {"gzip": 6, "zstd": 3}


class _HashedStream:
    """A compressed stream (gzip or zstd) written to ``out``, hashing both sides as it goes."""

    def __init__(self, out: BinaryIO, level: int | None, compression: str = "gzip") -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        level = DEFAULT_LEVELS[compression] if level is None else level
        self._gzip = compression == "gzip"
        self._out = out
        self._tar_sha = hashlib.sha256()
        self._tar_size = 0
        self._crc = 0
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5()
        self._size = 0
        self._compressor: Any
        if self._gzip:
            if not 0 <= level <= 9:
                raise ValueError(f"gzip level must be within 0..9, got {level}")
            # zlib-ng: the same DEFLATE format, about twice zlib's speed at the same level.
            # Its output is part of every layer's digest, so its version is pinned.
            self._compressor = zlib_ng.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
            xfl = 2 if level == 9 else 4 if level == 1 else 0
            # magic, deflate, no flags (no name), mtime 0, extra flags, OS "unknown".
            self._emit(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255]))
        else:
            import zstandard

            if not 1 <= level <= 19:
                raise ValueError(f"zstd level must be within 1..19, got {level}")
            # One thread and no content size in the frame: the same bytes every time.
            self._compressor = zstandard.ZstdCompressor(
                level=level, write_checksum=True, write_content_size=False, threads=0
            ).compressobj()

    @property
    def tar_size(self) -> int:
        return self._tar_size

    def _emit(self, data: bytes) -> None:
        if data:
            self._sha.update(data)
            self._md5.update(data)
            self._size += len(data)
            self._out.write(data)

    def write(self, data: bytes | memoryview) -> None:
        """Add uncompressed tar bytes to the stream."""
        self._tar_sha.update(data)
        self._tar_size += len(data)
        if self._gzip:
            self._crc = zlib_ng.crc32(data, self._crc)
        self._emit(self._compressor.compress(data))

    def finish(self) -> BlobInfo:
        """End the stream and say what was written."""
        if self._gzip:
            self._emit(self._compressor.flush(zlib.Z_FINISH))
            self._emit(struct.pack("<II", self._crc & 0xFFFFFFFF, self._tar_size & 0xFFFFFFFF))
        else:
            self._emit(self._compressor.flush())
        return BlobInfo(
            digest="sha256:" + self._sha.hexdigest(),
            diff_id="sha256:" + self._tar_sha.hexdigest(),
            size=self._size,
            md5=self._md5.hexdigest(),
        )


def _header(entry: _Entry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if isinstance(entry, _Dir):
        info.type = tarfile.DIRTYPE
        info.mode = entry.mode
        info.uid = info.gid = entry.owner
    elif isinstance(entry, _Data):
        info.type = tarfile.REGTYPE
        info.mode = entry.mode
        info.size = len(entry.data)
    elif isinstance(entry, _File):
        info.type = tarfile.REGTYPE
        info.mode = entry.mode
        info.size = entry.size
    else:
        info.type = tarfile.SYMTYPE
        info.mode = 0o777
        info.linkname = entry.target
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _copy_file(entry: _File, stream: _HashedStream) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    remaining = entry.size
    with open(entry.source, "rb") as f:
        while remaining > 0:
            n = f.readinto(view[: min(CHUNK, remaining)])
            if not n:
                raise ValueError(f"{entry.source} shrank while it was archived")
            stream.write(view[:n])
            remaining -= n
        if f.read(1):
            raise ValueError(f"{entry.source} grew while it was archived")
    padding = -entry.size % _BLOCK
    if padding:
        stream.write(bytes(padding))


def _write_entries(
    entries: Iterable[_Entry], out: BinaryIO, level: int | None, compression: str
) -> BlobInfo:
    stream = _HashedStream(out, level, compression)
    for entry in entries:
        stream.write(_header(entry))
        if isinstance(entry, _File):
            _copy_file(entry, stream)
        elif isinstance(entry, _Data):
            stream.write(entry.data + bytes(-len(entry.data) % _BLOCK))
    stream.write(bytes(2 * _BLOCK))  # end-of-archive marker
    padding = -stream.tar_size % _RECORD
    if padding:
        stream.write(bytes(padding))
    return stream.finish()


# --- public ----------------------------------------------------------------------


def write_layer(
    paths: Sequence[str], out: BinaryIO, *, level: int | None = None, compression: str = "gzip"
) -> BlobInfo:
    """Write one deterministic tar.gz of ``paths`` (absolute local paths) to ``out``.

    Each path is archived under its absolute name without the leading "/"
    (``nix/store/<hash>-foo/bin/foo``), after directory entries for its parents
    (``nix/``, ``nix/store/``, mode 0o555). Modes of files and directories are
    kept as on disk.
    """
    return _write_entries(_layer_entries(paths), out, level, compression)


class _Tree:
    """A directory of the merged symlink tree."""

    def __init__(self, mode: int = SYMLINK_LAYER_DIR_MODE, owner: int = 0) -> None:
        self.mode = mode
        self.owner = owner
        self.children: dict[str, _Tree | str | bytes] = {}  # str: a symlink target; bytes: a file


MAX_LINK_HOPS = 40
"""Symlinks followed while resolving one path, as the kernel allows (ELOOP past it)."""


def store_target(path: str, store: str) -> str | None:
    """The real path that ``path`` (below ``store``) leads to, resolved one component at a
    time the way the kernel does, without ever looking at anything outside ``store``.

    None when the path leaves the store (an absolute link elsewhere, ``..`` past the
    store, a link to the store directory itself), dangles, or loops. Nothing outside
    the store is ever stat'ed or read, so a hostile package cannot make the layer
    depend on the host.
    """
    store = store.rstrip("/")
    if not path.startswith(store + "/"):
        return None
    done = store  # a real directory, never above the store
    rest = path[len(store) + 1:].split("/")
    hops = 0
    while rest:
        name = rest.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if done == store:
                return None
            done = os.path.dirname(done)
            continue
        candidate = done + "/" + name
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                if not target.startswith(store + "/"):
                    return None
                done, target = store, target[len(store) + 1:]
            rest = target.split("/") + rest
        elif rest and not stat.S_ISDIR(st.st_mode):
            return None  # a file in the middle of a path
        else:
            done = candidate
    return None if done == store else done


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _merge_into(tree: _Tree, source: str, real_source: str, store: str, active: frozenset[str]) -> None:
    """Merge directory ``source`` (whose real path is ``real_source``) into ``tree``;
    earlier entries win conflicts.

    As buildEnv does, directories are merged and everything else becomes a link to
    its path under ``source``. A link to a directory is followed only when it
    resolves inside the store (openjdk's ``bin -> lib/openjdk/bin`` merges with
    other packages' ``bin``); a link out of the store (``etc -> /etc``), a dangling
    one, or one back into a directory being merged stays a link, never followed.

    Directories are merged from a stack, not by recursion: a package thousands of
    directories deep is merged like any other. (Within one source, siblings merge into
    distinct names, so the order they are taken in changes nothing.)
    """
    pending = [(tree, source, real_source, active)]
    while pending:
        tree, source, real_source, active = pending.pop()
        with os.scandir(real_source) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            path = os.path.join(source, child.name)
            existing = tree.children.get(child.name)
            real: str | None = None
            if child.is_dir(follow_symlinks=False):
                real = os.path.join(real_source, child.name)
            elif child.is_symlink():
                real = store_target(os.path.join(real_source, child.name), store)
                if real is not None and not _is_dir(real):
                    real = None
            if real is not None and real not in active:
                if existing is None:
                    existing = tree.children[child.name] = _Tree()
                if isinstance(existing, _Tree):
                    pending.append((existing, path, real, active | {real}))
            elif existing is None:
                tree.children[child.name] = path


def _tree_entries(tree: _Tree, prefix: str) -> Iterable[_Entry]:
    """Every entry of ``tree``, each directory before what it holds, from a stack (no
    recursion, whatever the depth)."""
    stack = [(iter(tree.children.items()), prefix)]
    while stack:
        children, at = stack[-1]
        step = next(children, None)
        if step is None:
            stack.pop()
            continue
        name, child = step
        full = at + name
        if isinstance(child, _Tree):
            yield _Dir(full, child.mode, child.owner)
            stack.append((iter(child.children.items()), full + "/"))
        elif isinstance(child, bytes):
            yield _Data(full, 0o644, child)
        else:
            yield _Symlink(full, child)


def _subtree(tree: _Tree, name: str) -> _Tree:
    child = tree.children.get(name)
    if not isinstance(child, _Tree):
        child = tree.children[name] = _Tree()
    return child


def write_symlink_layer(
    roots: Sequence[str],
    out: BinaryIO,
    *,
    env_target: str | None = None,
    files: Mapping[str, bytes] | None = None,
    homes: Mapping[str, int] | None = None,
    level: int | None = None,
    compression: str = "gzip",
) -> BlobInfo:
    """Write the merged tree of the top-level ``roots`` as one deterministic tar.gz.

    ``files`` (path -> bytes, e.g. ``etc/passwd``) are added where no package provides
    the path itself; ``homes`` (path -> owner) are directories owned by that uid and gid.

    Like Nix's ``buildEnv``: the directories of every root are merged into real
    directories (0o755); every other entry becomes a symlink to its absolute
    path in the root (``bin/git -> /nix/store/<hash>-git/bin/git``). A symlink
    to a directory is merged as a directory only when it resolves inside the
    store (the directory holding the root); see ``_merge_into``. When roots
    collide on a non-directory, the first root in sorted order wins. A root that
    is not a directory contributes nothing. ``tmp/`` (0o1777) is always there,
    and ``usr/bin/env -> env_target`` when ``env_target`` is given.
    """
    tree = _Tree()
    for root in sorted(set(roots), key=os.fsencode):
        if not os.path.isabs(root):
            raise ValueError(f"symlink layer roots must be absolute, got {root!r}")
        root = os.path.normpath(root)
        store = os.path.dirname(root)
        real = store_target(root, store)
        if real is not None and _is_dir(real):
            _merge_into(tree, root, real, store, frozenset([real]))
    _subtree(tree, "tmp").mode = TMP_MODE
    if env_target is not None:
        _subtree(_subtree(tree, "usr"), "bin").children["env"] = env_target
    for path, data in sorted((files or {}).items()):
        *parents, name = path.split("/")
        at: _Tree | None = tree
        for parent in parents:
            assert at is not None
            found = at.children.setdefault(parent, _Tree())
            at = found if isinstance(found, _Tree) else None  # a package's link: theirs
            if at is None:
                break
        if at is not None and name not in at.children:
            at.children[name] = data
    for path, owner in sorted((homes or {}).items()):
        at = tree
        for part in path.split("/"):
            at = _subtree(at, part)
        at.owner = owner
    return _write_entries(sorted(_tree_entries(tree, ""), key=_sort_key), out, level, compression)

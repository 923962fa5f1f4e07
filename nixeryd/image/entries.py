"""A layer's entries: what each path on disk becomes in a tar, and their order. Blocking:
run in a thread."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator, Sequence, Union

PARENT_DIR_MODE = 0o555


@dataclass(frozen=True)
class Dir:
    name: str  # without leading or trailing "/"
    mode: int
    owner: int = 0  # uid and gid alike


@dataclass(frozen=True)
class Data:
    """A small regular file whose bytes nixeryd makes (/etc/passwd and the like)."""

    name: str
    mode: int
    data: bytes


@dataclass(frozen=True)
class File:
    name: str
    mode: int
    size: int
    source: str  # absolute path on the local disk


@dataclass(frozen=True)
class Symlink:
    name: str
    target: str


Entry = Union[Dir, File, Symlink, Data]


def sort_key(entry: Entry) -> bytes:
    return os.fsencode(entry.name)


def _entry_for(path: str, name: str) -> Entry:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return Dir(name, stat.S_IMODE(st.st_mode))
    if stat.S_ISREG(st.st_mode):
        return File(name, stat.S_IMODE(st.st_mode), st.st_size, path)
    if stat.S_ISLNK(st.st_mode):
        return Symlink(name, os.readlink(path))
    raise ValueError(
        f"cannot archive {path}: only regular files, symlinks and directories are allowed"
    )


def _walk(top: str) -> Iterable[Entry]:
    """Every entry at and below ``top`` (not following symlinks), named without the leading "/"."""
    stack = [top]
    while stack:
        path = stack.pop()
        entry = _entry_for(path, path.lstrip("/"))
        yield entry
        if isinstance(entry, Dir):
            with os.scandir(path) as it:
                stack.extend(os.path.join(path, child.name) for child in it)


def _top(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"layer paths must be absolute, got {path!r}")
    path = os.path.normpath(path)
    if path == "/":
        raise ValueError("cannot archive the root directory")
    return path


def _parents(top: str) -> Iterator[Dir]:
    """The directories above ``top``, as a layer holds them."""
    parent = os.path.dirname(top)
    while parent != "/":
        yield Dir(parent.lstrip("/"), PARENT_DIR_MODE)
        parent = os.path.dirname(parent)


def layer_entries(paths: Sequence[str]) -> list[Entry]:
    """Every entry of a layer of ``paths``, parents first, sorted bytewise by name."""
    entries: dict[str, Entry] = {}
    for path in map(_top, paths):
        for parent in _parents(path):
            entries.setdefault(parent.name, parent)
        for entry in _walk(path):
            entries[entry.name] = entry
    return sorted(entries.values(), key=sort_key)


def _walked(top: str) -> list[Entry]:
    return sorted(_walk(top), key=sort_key)


def streamed_entries(paths: Sequence[str], walker: ThreadPoolExecutor) -> Iterator[Entry]:
    """``layer_entries(paths)``, in the same order, walked a path at a time on ``walker``
    ahead of the caller: the first path's entries are packed while the others are listed.
    That order is the whole sorted order when no path is a prefix of another as a string
    (store paths never are: their hashes have one length); otherwise all are listed first."""
    tops = sorted({_top(path) for path in paths}, key=os.fsencode)
    encoded = [os.fsencode(top) for top in tops]
    if len(tops) < 2 or any(later.startswith(earlier) for earlier, later in zip(encoded, encoded[1:], strict=False)):
        yield from layer_entries(paths)  # one path: nothing to list ahead of the packing
        return
    parents = {parent.name: parent for top in tops for parent in _parents(top)}
    # The first path here, at once; the others on the walker's threads meanwhile.
    later = [walker.submit(_walked, top) for top in tops[1:]]
    walks = chain([_walked(tops[0])], (walk.result() for walk in later))
    units: list[tuple[bytes, Entry | None]] = [(sort_key(entry), entry) for entry in parents.values()]
    units += [(os.fsencode(top.lstrip("/")), None) for top in tops]
    for _, parent_entry in sorted(units, key=lambda unit: unit[0]):
        if parent_entry is not None:
            yield parent_entry
        else:
            yield from next(walks)

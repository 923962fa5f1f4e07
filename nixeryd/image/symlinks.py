"""The symlink layer: the merged tree of an image's top-level packages, as Nix's
``buildEnv`` makes it (``/bin/git -> /nix/store/<hash>-git/bin/git``), resolved without
ever looking outside the store, with the account files and homes every image holds.
Written through ``archive`` as every layer is."""
from __future__ import annotations

import os
import stat
from typing import BinaryIO, Iterable, Mapping, Sequence

from nixeryd.core.blobs import BlobInfo
from nixeryd.image.archive import write_entries
from nixeryd.image.entries import Data, Dir, Entry, Symlink, sort_key

SYMLINK_LAYER_DIR_MODE = 0o755
TMP_MODE = 0o1777


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


def _tree_entries(tree: _Tree, prefix: str) -> Iterable[Entry]:
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
            yield Dir(full, child.mode, child.owner)
            stack.append((iter(child.children.items()), full + "/"))
        elif isinstance(child, bytes):
            yield Data(full, 0o644, child)
        else:
            yield Symlink(full, child)


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
    return write_entries(sorted(_tree_entries(tree, ""), key=sort_key), out, level, compression)

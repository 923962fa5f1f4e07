"""What Nix prints: its standard error as bounded lines, and the JSON it answers with on
standard output, every field checked before it is believed. Pure: no I/O, no Twisted."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from nixeryd.build.failures import NixBuildFailed
from nixeryd.image.layers import PathInfo

MAX_LINE = 256 * 1024
"""Longest stderr line assembled whole; a builder's longer line is cut, never kept whole."""
MAX_STDOUT = 64 * 1024 * 1024
"""Most bytes of a Nix command's standard output kept (what an image of every package of
nixpkgs would print is a few MB)."""
KEPT_LINE = 1024
"""Longest line kept in the tail, logged, or shown in an error."""


class LineAssembler:
    """Splits a byte stream into lines in linear time, keeping at most ``limit`` bytes of
    any line: the rest of an over-long line is counted, not kept. Lines come out as
    (bytes kept, bytes cut)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._cut = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines ``data`` completes, without their newlines."""
        lines: list[tuple[bytes, int]] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return lines
            self._keep(data[start:end])
            lines.append(self._take())
            start = end + 1

    def flush(self) -> tuple[bytes, int] | None:
        """The unfinished last line, if any, at the end of the stream."""
        if not self._chunks and not self._cut:
            return None
        return self._take()

    def _keep(self, piece: bytes) -> None:
        room = self._limit - self._size
        if len(piece) > room:
            self._cut += len(piece) - max(room, 0)
            piece = piece[:max(room, 0)]
        if piece:
            self._chunks.append(piece)
            self._size += len(piece)

    def _take(self) -> tuple[bytes, int]:
        line = b"".join(self._chunks), self._cut
        self._chunks, self._size, self._cut = [], 0, 0
        return line


def shorten(raw: bytes, limit: int, cut: int = 0) -> str:
    """A line as it is kept and shown: at most ``limit`` bytes of it, then a count of the
    bytes left out (``cut`` of them already dropped while it was read)."""
    more = max(len(raw) - limit, 0) + cut
    text = raw[:limit].decode("utf-8", "replace").rstrip("\r")
    return text + f" [{more} more bytes]" if more else text


@dataclass(frozen=True)
class Info:
    """What evaluating build.nix's ``info`` told: see nix/build.nix."""

    not_found: tuple[str, ...]
    throwing: tuple[str, ...]
    roots: dict[str, str]  # name -> its default output
    derivations: tuple[str, ...]
    revision: str | None
    programs: dict[str, str | None]
    meta: dict[str, dict[str, str]]
    derivers: dict[str, str]  # name -> the derivation of its default output


STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[^/]+")


def parse_info(data: bytes, overflowed: bool = False) -> Info:
    """build.nix's ``info`` as ``nix-instantiate --eval --json`` prints it, every field
    checked for its type: anything else is a failed build, never a guess."""
    if overflowed:
        raise NixBuildFailed(f"Nix's answer was longer than {MAX_STDOUT} bytes")
    try:
        doc = json.loads(data)
        if not (all(isinstance(doc[k], list) for k in ("notFound", "throwing", "drvs"))
                and all(isinstance(doc[k], dict) for k in ("roots", "programs", "meta"))):
            raise TypeError("a field of the wrong type")
        names = [str(n) for n in doc["notFound"]]
        throwing = [str(n) for n in doc["throwing"]]
        roots = {str(k): str(v) for k, v in doc["roots"].items()}
        derivations = tuple(str(d) for d in doc["drvs"])
        derivers = {str(k): str(v) for k, v in doc.get("derivers", {}).items()}
        revision = doc["revision"]
        programs = {str(k): v if isinstance(v, str) else None for k, v in doc["programs"].items()}
        meta = {str(k): {f: v[f] for f in ("license", "homepage") if isinstance(v.get(f), str)}
                for k, v in doc["meta"].items() if isinstance(v, dict)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise NixBuildFailed(f"unreadable answer from Nix: {e}") from None
    for path in [*roots.values(), *derivations, *derivers.values()]:
        if not STORE_PATH.fullmatch(path):
            raise NixBuildFailed(f"unreadable answer from Nix: {path[:200]!r} is not a store path")
    return Info(tuple(names), tuple(throwing), roots, derivations,
                revision if isinstance(revision, str) else None, programs, meta, derivers)


def parse_closure(data: bytes) -> dict[str, PathInfo]:
    """``nix path-info --json --recursive`` output, as a list (Nix 2.8) or an object."""
    doc: Any = json.loads(data)
    entries: list[tuple[str, Any]]
    if isinstance(doc, list):
        entries = [(item["path"], item) for item in doc]
    elif isinstance(doc, dict):
        entries = list(doc.items())
    else:
        raise ValueError("unexpected path-info output")
    closure = {}
    for path, item in entries:
        closure[path] = PathInfo(
            path=path,
            references=tuple(sorted(item.get("references") or ())),
            nar_size=int(item["narSize"]),
        )
    return closure

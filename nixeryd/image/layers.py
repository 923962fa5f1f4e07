"""Grouping a runtime closure into layers. Pure.

The closure of an image is a graph: store paths are nodes, references are
edges. A virtual root points at every top-level path, and also at every path
that deserves a layer of its own (a big closure, a popular package), so that
such paths are not swallowed by whatever happens to reference them. The
dominator tree of that graph, seen from the virtual root, cuts the closure into
groups: each child of the root, with everything it dominates, is one candidate
layer. When there are more candidates than the layer budget, the two with the
lowest merge rating are merged until the budget is met.

Popularity data maps a package name to a count. The name is the store path's
name after its hash (``/nix/store/<hash>-git-2.40.1`` -> ``git-2.40.1``), see
``package_name``. The base packages every image holds (cacert, iana-etc) and
their closures are known by their store paths, not their names: they count as
more popular than anything in the data, are merged last, and come first.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import re
from dataclasses import dataclass
from typing import AbstractSet, Iterable, Mapping, Sequence


@dataclass(frozen=True)
class PathInfo:
    """One store path of a closure, as Nix reports it."""

    path: str  # "/nix/store/<hash>-<name>"
    references: tuple[str, ...]  # sorted; may include the path itself (dropped when grouping)
    nar_size: int


@dataclass(frozen=True)
class Layer:
    """A group of store paths that becomes one layer archive."""

    paths: tuple[str, ...]  # sorted
    size: int  # sum of NAR sizes
    rating: int  # merge rating; manifests order layers by it, highest first, base layers before all

    @property
    def key(self) -> str:
        """The layer's identity: sha256 hex of its sorted paths joined by newlines."""
        return layer_key(self.paths)


def layer_key(paths: Iterable[str]) -> str:
    """sha256 hex of ``paths``, sorted and joined by ``"\\n"``."""
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8", "surrogateescape")).hexdigest()


# Nix store hashes are 32 characters of Nix's base-32 alphabet; accept any
# lower-case alphanumerics so that test stores with made-up hashes work too.
_HASH_PREFIX = re.compile(r"^[0-9a-z]{32}-(.+)$")

def package_name(store_path: str) -> str:
    """The name popularity data is keyed by: the store path's name after its hash.

    ``/nix/store/<32-char hash>-git-2.40.1`` -> ``git-2.40.1``. A base name
    without a hash prefix is returned as it is.
    """
    base = store_path.rstrip("/").rsplit("/", 1)[-1]
    match = _HASH_PREFIX.match(base)
    return match.group(1) if match else base


def parse_popularity(data: bytes) -> dict[str, int]:
    """Parse popularity data: a JSON object mapping package names to counts."""
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"popularity data is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise ValueError(
            f"popularity data must be a JSON object of name -> count, got {type(parsed).__name__}"
        )
    result: dict[str, int] = {}
    for name, count in parsed.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"popularity of {name!r} must be a non-negative integer, got {count!r}"
            )
        result[name] = count
    return result


def popularity_of(
    store_path: str,
    popularity: Mapping[str, int],
    *,
    favoured: AbstractSet[str] = frozenset(),
    popularity_threshold: int = 100,
) -> int:
    """The popularity of one store path; ``favoured`` paths beat everything in the data."""
    if store_path in favoured:
        return max(max(popularity.values(), default=0), popularity_threshold) + 1
    return popularity.get(package_name(store_path), 0)


def closure_of(roots: Iterable[str], closure: Mapping[str, PathInfo]) -> frozenset[str]:
    """Every path ``roots`` reach through references, themselves included."""
    seen: set[str] = set()
    stack = [root for root in roots if root in closure]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        stack.extend(ref for ref in closure[path].references if ref in closure)
    return frozenset(seen)


def immediate_dominators(graph: Mapping[str, Iterable[str]], start: str) -> dict[str, str]:
    """Immediate dominator of every node reachable from ``start`` (``start`` excluded).

    Cooper, Harvey & Kennedy, "A Simple, Fast Dominance Algorithm" (2001):
    iterate over the nodes in reverse postorder, intersecting the dominators of
    the processed predecessors, until nothing changes. Successors are visited
    in sorted order, so the result does not depend on iteration order.
    """
    succs: dict[str, list[str]] = {}

    def successors(node: str) -> list[str]:
        if node not in succs:
            succs[node] = sorted(set(graph.get(node, ())))
        return succs[node]

    # Iterative depth-first search: postorder numbers.
    order: dict[str, int] = {}
    postorder: list[str] = []
    seen = {start}
    stack: list[tuple[str, int]] = [(start, 0)]
    while stack:
        node, i = stack[-1]
        children = successors(node)
        if i < len(children):
            stack[-1] = (node, i + 1)
            child = children[i]
            if child not in seen:
                seen.add(child)
                stack.append((child, 0))
        else:
            stack.pop()
            order[node] = len(postorder)
            postorder.append(node)

    preds: dict[str, list[str]] = {node: [] for node in postorder}
    for node in postorder:
        for child in successors(node):
            preds[child].append(node)

    idom: dict[str, str] = {start: start}

    def intersect(a: str, b: str) -> str:
        while a != b:
            while order[a] < order[b]:
                a = idom[a]
            while order[b] < order[a]:
                b = idom[b]
        return a

    rpo = [n for n in reversed(postorder) if n != start]
    changed = True
    while changed:
        changed = False
        for node in rpo:
            new: str | None = None
            for p in preds[node]:
                if p in idom:
                    new = p if new is None else intersect(p, new)
            assert new is not None  # a node in rpo has a predecessor processed before it
            if idom.get(node) != new:
                idom[node] = new
                changed = True
    del idom[start]
    return idom


def _check_closure(roots: Sequence[str], closure: Mapping[str, PathInfo]) -> None:
    for root in roots:
        if root not in closure:
            raise ValueError(f"top-level path {root} is not in the closure")
    for path, info in closure.items():
        if info.path != path:
            raise ValueError(f"closure entry {path} describes {info.path}")
        if info.nar_size < 0:
            raise ValueError(f"store path {path} has a negative size")
        for ref in info.references:
            if ref not in closure:
                raise ValueError(f"store path {path} references {ref}, which is not in the closure")


def _topological_order(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """Nodes with every node after all the nodes it references (leaves first)."""
    pending = {node: len(refs) for node, refs in graph.items()}
    referrers: dict[str, list[str]] = {node: [] for node in graph}
    for node in sorted(graph):
        for ref in graph[node]:
            referrers[ref].append(node)
    ready = sorted(node for node, n in pending.items() if n == 0)
    order: list[str] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for referrer in referrers[node]:
            pending[referrer] -= 1
            if pending[referrer] == 0:
                ready.append(referrer)
    if len(order) != len(graph):
        cyclic = sorted(node for node, n in pending.items() if n > 0)
        raise ValueError(f"the closure has a reference cycle through {cyclic[0]}")
    return order


def _big_closures(
    graph: Mapping[str, Sequence[str]], sizes: Mapping[str, int], threshold: int
) -> set[str]:
    """The paths whose closure size (their own size and all they reference) exceeds ``threshold``."""
    index = {node: i for i, node in enumerate(sorted(graph))}
    by_index = sorted(graph)
    masks: dict[str, int] = {}
    big: set[str] = set()
    for node in _topological_order(graph):
        mask = 1 << index[node]
        for ref in graph[node]:
            mask |= masks[ref]
        masks[node] = mask
        total = 0
        rest = mask
        while rest:
            low = rest & -rest
            total += sizes[by_index[low.bit_length() - 1]]
            if total > threshold:
                big.add(node)
                break
            rest ^= low
    return big


@dataclass(frozen=True)
class _Candidate:
    rating: int
    key: str
    paths: tuple[str, ...]
    size: int
    base: bool  # holds a base package's path: merged last, ordered first

    def __lt__(self, other: _Candidate) -> bool:
        return (self.base, self.rating, self.key) < (other.base, other.rating, other.key)


def _merge(a: _Candidate, b: _Candidate) -> _Candidate:
    paths = tuple(sorted(a.paths + b.paths))
    return _Candidate(a.rating + b.rating, layer_key(paths), paths, a.size + b.size,
                      a.base or b.base)


def group_layers(
    roots: Sequence[str],
    closure: Mapping[str, PathInfo],
    popularity: Mapping[str, int],
    budget: int = 93,
    *,
    favoured: AbstractSet[str] = frozenset(),
    size_threshold: int = 100 * 1024 * 1024,
    popularity_threshold: int = 100,
) -> list[Layer]:
    """Group every path of ``closure`` into at most ``budget`` layers.

    The merge rating of a candidate layer is ``(popularity of its root node + 1)
    x total NAR size``; the ``+ 1`` keeps zero-popularity layers ordered by
    size. A merged layer's rating is the sum of the two ratings. Ties are broken
    by layer key. ``favoured`` paths (the base packages' closures) rank above all
    popularity data; layers holding them are merged only when nothing else is
    left to merge. The result puts those layers first, then sorts by rating,
    highest first, then by key.
    """
    if budget < 1:
        raise ValueError(f"the layer budget must be at least 1, got {budget}")
    _check_closure(roots, closure)
    graph: dict[str, list[str]] = {
        path: sorted({ref for ref in info.references if ref != path})
        for path, info in closure.items()
    }
    sizes = {path: info.nar_size for path, info in closure.items()}
    pop = {
        path: popularity_of(path, popularity, favoured=favoured,
                            popularity_threshold=popularity_threshold)
        for path in closure
    }

    referenced = {ref for refs in graph.values() for ref in refs}
    root_edges = set(roots)
    root_edges |= _big_closures(graph, sizes, size_threshold)
    root_edges |= {path for path in closure if pop[path] >= popularity_threshold}
    # A path nothing references and that is not top-level would otherwise be lost.
    root_edges |= {path for path in closure if path not in referenced}

    virtual_root = ""  # never a store path
    full: dict[str, list[str]] = dict(graph)
    full[virtual_root] = sorted(root_edges)
    idom = immediate_dominators(full, virtual_root)

    children: dict[str, list[str]] = {}
    for node in sorted(idom):
        children.setdefault(idom[node], []).append(node)
    candidates: list[_Candidate] = []
    for top in children.get(virtual_root, []):
        members: list[str] = []
        stack = [top]
        while stack:
            node = stack.pop()
            members.append(node)
            stack.extend(children.get(node, ()))
        paths = tuple(sorted(members))
        size = sum(sizes[p] for p in paths)
        candidates.append(_Candidate((pop[top] + 1) * size, layer_key(paths), paths, size,
                                     any(p in favoured for p in paths)))

    heapq.heapify(candidates)
    while len(candidates) > budget:
        a = heapq.heappop(candidates)
        b = heapq.heappop(candidates)
        heapq.heappush(candidates, _merge(a, b))

    candidates.sort(key=lambda c: (not c.base, -c.rating, c.key))
    return [Layer(paths=c.paths, size=c.size, rating=c.rating) for c in candidates]

"""Tests for nixeryd.image.layers: popularity, dominators and layer grouping."""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence

import pytest

from nixeryd.image.layers import (
    Layer,
    PathInfo,
    group_layers,
    immediate_dominators,
    layer_key,
    package_name,
    parse_popularity,
    popularity_of,
)
from nixeryd.image.layers import (
    closure_of as closure_paths,
)

MB = 1024 * 1024


def sp(name: str) -> str:
    """A store path with a made-up 32-character hash."""
    return f"/nix/store/{hashlib.md5(name.encode()).hexdigest()}-{name}"


def closure_of(spec: Mapping[str, tuple[int, Sequence[str]]]) -> dict[str, PathInfo]:
    """Build a closure from name -> (size, referenced names)."""
    return {
        sp(name): PathInfo(sp(name), tuple(sorted(sp(r) for r in refs)), size)
        for name, (size, refs) in spec.items()
    }


def names(layer: Layer) -> set[str]:
    return {package_name(p) for p in layer.paths}


def layer_sets(layers: Sequence[Layer]) -> list[set[str]]:
    return [names(layer) for layer in layers]


def assert_partition(layers: Sequence[Layer], closure: Mapping[str, PathInfo]) -> None:
    all_paths = [p for layer in layers for p in layer.paths]
    assert sorted(all_paths) == sorted(closure)
    for layer in layers:
        assert list(layer.paths) == sorted(layer.paths)
        assert layer.size == sum(closure[p].nar_size for p in layer.paths)


# --- names and popularity ---------------------------------------------------


def test_package_name_strips_hash() -> None:
    """The popularity key of a store path is its name after the hash."""
    assert package_name("/nix/store/" + "a" * 32 + "-git-2.40.1") == "git-2.40.1"
    assert package_name("/nix/store/" + "0" * 32 + "-python3.11-numpy-1.2") == "python3.11-numpy-1.2"


def test_package_name_without_hash() -> None:
    """A base name without a store hash is returned unchanged."""
    assert package_name("/somewhere/plain-name") == "plain-name"


def test_parse_popularity() -> None:
    """Popularity data is a JSON object of name -> count."""
    assert parse_popularity(b'{"git-2.40.1": 12, "htop-3": 0}') == {"git-2.40.1": 12, "htop-3": 0}


@pytest.mark.parametrize(
    "data,message",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"a": "7"}', "non-negative integer"),
        (b'{"a": -1}', "non-negative integer"),
        (b'{"a": true}', "non-negative integer"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_parse_popularity_rejects_bad_data(data: bytes, message: str) -> None:
    """Malformed popularity data raises ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_popularity(data)


def test_favoured_paths_are_most_popular() -> None:
    """Base packages' paths rank above the most popular entry and the threshold, by
    identity: a path merely named like them ranks by the data."""
    pop = {"glibc-2.37": 5000, "nss-cacert-3.86": 1, "cacert-3.86": 1}
    base = frozenset({sp("nss-cacert-3.86"), sp("iana-etc-20230316")})
    assert popularity_of(sp("nss-cacert-3.86"), pop, favoured=base) == 5001
    assert popularity_of(sp("iana-etc-20230316"), pop, favoured=base) == 5001
    assert popularity_of(sp("iana-etc-20230316"), {}, favoured=base) == 101
    assert popularity_of(sp("cacert-3.86"), pop, favoured=base) == 1
    assert popularity_of(sp("glibc-2.37"), pop, favoured=base) == 5000
    assert popularity_of(sp("unknown-1"), pop, favoured=base) == 0


def test_closure_of_follows_references() -> None:
    """The closure of some roots is every path they reach, and nothing else."""
    closure = closure_of({"a": (1, ["b"]), "b": (1, ["c"]), "c": (1, []), "d": (1, ["a"])})
    assert closure_paths([sp("a")], closure) == {sp("a"), sp("b"), sp("c")}
    assert closure_paths([], closure) == frozenset()


# --- dominators ---------------------------------------------------------------


def test_dominators_lengauer_tarjan_example() -> None:
    """The example graph of Lengauer & Tarjan's paper gives its known dominator tree."""
    graph = {
        "R": ["A", "B", "C"],
        "A": ["D"],
        "B": ["A", "D", "E"],
        "C": ["F", "G"],
        "D": ["L"],
        "E": ["H"],
        "F": ["I"],
        "G": ["I", "J"],
        "H": ["E", "K"],
        "I": ["K"],
        "J": ["I"],
        "K": ["I", "R"],
        "L": ["H"],
    }
    expected = dict.fromkeys("ABCDEHIK", "R")
    expected.update(F="C", G="C", J="G", L="D")
    assert immediate_dominators(graph, "R") == expected


def test_dominators_irreducible_graphs() -> None:
    """The irreducible graphs of Cooper, Harvey & Kennedy's paper (figures 2 and 4) resolve to the root."""
    fig2 = {"5": ["4", "3"], "4": ["1"], "3": ["2"], "1": ["2"], "2": ["1"]}
    assert immediate_dominators(fig2, "5") == dict.fromkeys("1234", "5")
    fig4 = {"6": ["5", "4"], "5": ["1"], "4": ["2", "3"], "1": ["2"], "2": ["1", "3"], "3": ["2"]}
    assert immediate_dominators(fig4, "6") == dict.fromkeys("12345", "6")


def test_dominators_diamond_and_chain() -> None:
    """In a diamond the join is dominated by the fork; in a chain each node by its predecessor."""
    graph = {"r": ["a"], "a": ["b", "c"], "b": ["d"], "c": ["d"], "d": ["e"]}
    assert immediate_dominators(graph, "r") == {"a": "r", "b": "a", "c": "a", "d": "a", "e": "d"}


def test_dominators_ignore_unreachable_nodes() -> None:
    """Nodes not reachable from the start have no immediate dominator."""
    graph = {"r": ["a"], "x": ["a", "y"]}
    assert immediate_dominators(graph, "r") == {"a": "r"}


def _reachable(graph: Mapping[str, Sequence[str]], start: str, removed: str | None) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt != removed and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


@pytest.mark.parametrize("seed", range(30))
def test_dominators_match_brute_force(seed: int) -> None:
    """On random graphs the result agrees with dominance computed by removing each node."""
    rng = random.Random(seed)
    nodes = [str(i) for i in range(rng.randint(2, 14))]
    graph = {n: rng.sample(nodes, rng.randint(0, 3)) for n in nodes}
    start = nodes[0]
    reach = _reachable(graph, start, None)
    strict = {
        n: {d for d in reach if d != n and (d == start or n not in _reachable(graph, start, d))}
        for n in reach
    }
    idom = immediate_dominators(graph, start)
    assert set(idom) == reach - {start}
    for n, d in idom.items():
        assert strict[n] == {d} | strict[d]


# --- grouping -----------------------------------------------------------------


def test_shared_dependency_gets_own_layer() -> None:
    """A dependency shared by two top-level paths is not dominated by either and forms its own layer."""
    closure = closure_of(
        {
            "git": (10, ["git", "curl", "glibc"]),
            "curl": (5, ["glibc"]),
            "htop": (3, ["ncurses", "glibc"]),
            "ncurses": (2, []),
            "glibc": (30, []),
        }
    )
    layers = group_layers([sp("git"), sp("htop")], closure, {})
    assert_partition(layers, closure)
    assert sorted(map(sorted, layer_sets(layers))) == [
        ["curl", "git"],
        ["glibc"],
        ["htop", "ncurses"],
    ]


def test_big_path_pulled_out() -> None:
    """A path whose closure exceeds the size threshold becomes its own layer."""
    closure = closure_of(
        {
            "app": (1, ["big"]),
            "big": (150 * MB, ["small"]),
            "small": (1, []),
        }
    )
    layers = group_layers([sp("app")], closure, {})
    assert_partition(layers, closure)
    assert sorted(map(sorted, layer_sets(layers))) == [["app"], ["big", "small"]]


def test_big_closure_of_small_paths_pulled_out() -> None:
    """The threshold applies to a path's whole closure, not its own size."""
    closure = closure_of(
        {
            "app": (1, ["mid"]),
            "mid": (1, ["a", "b"]),
            "a": (60 * MB, []),
            "b": (60 * MB, []),
        }
    )
    layers = group_layers([sp("app")], closure, {})
    assert sorted(map(sorted, layer_sets(layers))) == [["a", "b", "mid"], ["app"]]
    small = group_layers([sp("app")], closure, {}, size_threshold=200 * MB)
    assert layer_sets(small) == [{"app", "mid", "a", "b"}]


def test_popular_path_pulled_out() -> None:
    """A path at or above the popularity threshold becomes its own layer."""
    closure = closure_of({"app": (5, ["zlib", "other"]), "zlib": (1, []), "other": (1, [])})
    layers = group_layers([sp("app")], closure, {"zlib": 100, "other": 99})
    assert sorted(map(sorted, layer_sets(layers))) == [["app", "other"], ["zlib"]]
    lower = group_layers([sp("app")], closure, {"zlib": 100}, popularity_threshold=101)
    assert layer_sets(lower) == [{"app", "zlib", "other"}]


def test_base_packages_always_pulled_out_and_first() -> None:
    """The base packages' paths get their own layers and come before popular, bigger
    layers, even without data; they are found by identity (nixpkgs names cacert
    nss-cacert-<version>)."""
    closure = closure_of(
        {
            "app": (50, ["nss-cacert-3.86", "iana-etc-2023", "glibc"]),
            "nss-cacert-3.86": (2, []),
            "iana-etc-2023": (1, []),
            "glibc": (30, []),
        }
    )
    base = frozenset({sp("nss-cacert-3.86"), sp("iana-etc-2023")})
    layers = group_layers([sp("app")], closure, {"glibc": 1000}, favoured=base)
    assert [(names(layer), layer.rating) for layer in layers] == [
        ({"nss-cacert-3.86"}, 1002 * 2),
        ({"iana-etc-2023"}, 1002 * 1),
        ({"glibc"}, 1001 * 30),
        ({"app"}, 50),
    ]
    no_data = group_layers([sp("app")], closure, {}, favoured=base)
    assert sorted(map(sorted, layer_sets(no_data))) == [["app", "glibc"], ["iana-etc-2023"], ["nss-cacert-3.86"]]
    assert layer_sets(no_data)[:2] == [{"nss-cacert-3.86"}, {"iana-etc-2023"}]
    # Without knowing which paths are base packages, nothing is special about the name.
    unknown = group_layers([sp("app")], closure, {"glibc": 1000})
    assert layer_sets(unknown)[0] == {"glibc"}
    assert {"nss-cacert-3.86"} not in layer_sets(unknown)


def test_base_layers_are_merged_last() -> None:
    """Under a tight budget, the other layers are merged before a base package's layer."""
    closure = closure_of(
        {
            "a": (5, []), "b": (6, []), "c": (7, []),
            "nss-cacert-3.86": (1, []),
        }
    )
    base = frozenset({sp("nss-cacert-3.86")})
    roots = [sp(n) for n in ["a", "b", "c", "nss-cacert-3.86"]]
    layers = group_layers(roots, closure, {}, 2, favoured=base)
    assert layer_sets(layers) == [{"nss-cacert-3.86"}, {"a", "b", "c"}]


def test_rating_is_popularity_plus_one_times_size() -> None:
    """A layer's rating is (root popularity + 1) x its size, and layers come highest first."""
    closure = closure_of({"a": (10, []), "b": (100, []), "c": (7, ["d"]), "d": (3, [])})
    layers = group_layers([sp("a"), sp("b"), sp("c")], closure, {"a": 20, "c": 1})
    assert [(names(layer), layer.rating) for layer in layers] == [
        ({"a"}, 21 * 10),
        ({"b"}, 100),
        ({"c", "d"}, 2 * 10),
    ]


def test_budget_merges_to_exactly_budget() -> None:
    """200 independent paths with a budget of 10 give 10 layers holding every path once."""
    closure = closure_of({f"p{i}": (i + 1, []) for i in range(200)})
    layers = group_layers(sorted(closure), closure, {}, budget=10)
    assert len(layers) == 10
    assert_partition(layers, closure)
    assert sum(layer.rating for layer in layers) == sum(range(1, 201))
    ratings = [layer.rating for layer in layers]
    assert ratings == sorted(ratings, reverse=True)


def test_budget_merges_lowest_rated_first() -> None:
    """Merging picks the two lowest-rated layers and rates the merge as their sum."""
    closure = closure_of({"a": (1, []), "b": (2, []), "c": (50, []), "d": (40, [])})
    layers = group_layers(sorted(closure), closure, {}, budget=3)
    assert [(names(layer), layer.rating) for layer in layers] == [
        ({"c"}, 50),
        ({"d"}, 40),
        ({"a", "b"}, 3),
    ]
    merged_again = group_layers(sorted(closure), closure, {}, budget=2)
    assert [names(layer) for layer in merged_again] == [{"c"}, {"a", "b", "d"}]


def test_budget_one_gives_single_layer() -> None:
    """A budget of one puts the whole closure in one layer; zero is refused."""
    closure = closure_of({"a": (1, ["b"]), "b": (1, []), "c": (1, [])})
    assert layer_sets(group_layers([sp("a"), sp("c")], closure, {}, budget=1)) == [{"a", "b", "c"}]
    with pytest.raises(ValueError, match="budget"):
        group_layers([sp("a")], closure, {}, budget=0)


def _shuffled(closure: Mapping[str, PathInfo], rng: random.Random) -> dict[str, PathInfo]:
    items = list(closure.items())
    rng.shuffle(items)
    out = {}
    for path, info in items:
        refs = list(info.references)
        rng.shuffle(refs)
        out[path] = PathInfo(path, tuple(refs), info.nar_size)
    return out


def test_deterministic_whatever_the_order() -> None:
    """Shuffled closure, references and roots give the same layers."""
    rng = random.Random(7)
    spec: dict[str, tuple[int, list[str]]] = {}
    for i in range(120):
        refs = [f"n{j}" for j in rng.sample(range(i), min(i, rng.randint(0, 4)))]
        spec[f"n{i}"] = (rng.choice([1, 1, 5, 5, 9]), refs)
    closure = closure_of(spec)
    roots = [sp(f"n{i}") for i in range(100, 120)]
    pop = {"n3": 150, "n7": 100}
    expected = group_layers(roots, closure, pop, budget=8)
    assert_partition(expected, closure)
    for _ in range(5):
        shuffled_roots = list(roots)
        rng.shuffle(shuffled_roots)
        assert group_layers(shuffled_roots, _shuffled(closure, rng), pop, budget=8) == expected


def test_self_references_are_ignored() -> None:
    """A path referencing itself groups as if it did not."""
    closure = closure_of({"a": (1, ["a", "b"]), "b": (1, ["b"])})
    assert layer_sets(group_layers([sp("a")], closure, {})) == [{"a", "b"}]


def test_unreferenced_extra_paths_still_placed() -> None:
    """A closure path that no root reaches still lands in exactly one layer."""
    closure = closure_of({"a": (1, []), "stray": (1, ["dep"]), "dep": (1, [])})
    layers = group_layers([sp("a")], closure, {})
    assert_partition(layers, closure)


def test_root_not_in_closure_rejected() -> None:
    """A top-level path missing from the closure raises ValueError."""
    closure = closure_of({"a": (1, [])})
    with pytest.raises(ValueError, match="not in the closure"):
        group_layers([sp("missing")], closure, {})


def test_unknown_reference_rejected() -> None:
    """A reference to a path outside the closure raises ValueError."""
    closure = {sp("a"): PathInfo(sp("a"), (sp("ghost"),), 1)}
    with pytest.raises(ValueError, match="ghost"):
        group_layers([sp("a")], closure, {})


def test_reference_cycle_rejected() -> None:
    """A reference cycle between distinct paths, impossible in Nix, raises ValueError."""
    closure = closure_of({"a": (1, ["b"]), "b": (1, ["a"])})
    with pytest.raises(ValueError, match="cycle"):
        group_layers([sp("a")], closure, {})


def test_layer_key_is_hash_of_sorted_paths() -> None:
    """A layer's key is sha256 of its sorted paths joined by newlines, whatever the order given."""
    layer = Layer(paths=(sp("a"), sp("b")), size=2, rating=2)
    expected = hashlib.sha256("\n".join(sorted([sp("a"), sp("b")])).encode()).hexdigest()
    assert layer.key == expected
    assert layer_key([sp("b"), sp("a")]) == expected


def test_nixery_like_image() -> None:
    """A shell image: glibc and common paths are shared layers, each package keeps its own deps."""
    closure = closure_of(
        {
            "bash-interactive-5.2": (8 * MB, ["glibc-2.37", "readline-8.2", "ncurses-6.4"]),
            "readline-8.2": (1 * MB, ["ncurses-6.4", "glibc-2.37"]),
            "ncurses-6.4": (3 * MB, ["glibc-2.37"]),
            "coreutils-9.1": (9 * MB, ["glibc-2.37", "acl-2.3", "attr-2.5"]),
            "acl-2.3": (1, ["attr-2.5", "glibc-2.37"]),
            "attr-2.5": (1, ["glibc-2.37"]),
            "glibc-2.37": (30 * MB, ["libidn2-2.3", "xgcc-12-libgcc"]),
            "libidn2-2.3": (1 * MB, ["libunistring-1.1"]),
            "libunistring-1.1": (2 * MB, []),
            "xgcc-12-libgcc": (1, []),
            "cacert-3.86": (1 * MB, []),
            "iana-etc-20230316": (1, []),
            "git-2.40.1": (50 * MB, ["glibc-2.37", "curl-8.0", "perl-5.36"]),
            "curl-8.0": (2 * MB, ["glibc-2.37"]),
            "perl-5.36": (60 * MB, ["glibc-2.37"]),
        }
    )
    roots = [sp(n) for n in ["bash-interactive-5.2", "coreutils-9.1", "git-2.40.1", "cacert-3.86", "iana-etc-20230316"]]
    pop = {"glibc-2.37": 2000, "perl-5.36": 300, "ncurses-6.4": 10}
    base = frozenset({sp("cacert-3.86"), sp("iana-etc-20230316")})
    layers = group_layers(roots, closure, pop, favoured=base)
    assert_partition(layers, closure)
    sets = layer_sets(layers)
    assert {"glibc-2.37", "libidn2-2.3", "libunistring-1.1", "xgcc-12-libgcc"} in sets
    assert {"perl-5.36"} in sets
    assert {"git-2.40.1", "curl-8.0"} in sets
    assert {"coreutils-9.1", "acl-2.3", "attr-2.5"} in sets
    assert {"bash-interactive-5.2", "readline-8.2", "ncurses-6.4"} in sets
    # Base packages first; then glibc: 2001 x 33 MB; perl: 301 x 60 MB; then by size.
    assert sets[:5] == [
        {"cacert-3.86"},
        {"iana-etc-20230316"},
        {"glibc-2.37", "libidn2-2.3", "libunistring-1.1", "xgcc-12-libgcc"},
        {"perl-5.36"},
        {"git-2.40.1", "curl-8.0"},
    ]

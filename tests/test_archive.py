"""Tests for nixeryd.image.archive: deterministic, hashed-while-written layer archives."""
from __future__ import annotations

import gc
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixeryd.core.blobs import BlobInfo, blob_info
from nixeryd.image.archive import write_layer
from nixeryd.image.compress import BLOCK, GzipMembers
from nixeryd.image.symlinks import write_symlink_layer


def make_package(store: Path, name: str) -> Path:
    """A small store-path-like tree: a file, an executable, a symlink, an empty dir."""
    pkg = store / name
    (pkg / "bin").mkdir(parents=True)
    (pkg / "share" / "empty").mkdir(parents=True)
    (pkg / "bin" / name).write_bytes(b"#!/bin/sh\necho " + name.encode() + b"\n")
    (pkg / "bin" / name).chmod(0o555)
    (pkg / "share" / "README").write_bytes(b"read me\n" * 100)
    (pkg / "share" / "README").chmod(0o444)
    (pkg / "bin" / "alias").symlink_to(name)
    return pkg


def layer_bytes(paths: list[str], **kwargs: int) -> tuple[bytes, BlobInfo]:
    out = io.BytesIO()
    info = write_layer(paths, out, **kwargs)
    return out.getvalue(), info


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getmembers()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    s = tmp_path / "nix" / "store"
    s.mkdir(parents=True)
    return s


def test_same_input_same_bytes(store: Path) -> None:
    """Writing the same paths twice, in any order, gives identical bytes and digests."""
    a = str(make_package(store, "aaaa-foo"))
    b = str(make_package(store, "bbbb-bar"))
    first, info1 = layer_bytes([a, b])
    second, info2 = layer_bytes([b, a])
    assert first == second
    assert info1 == info2


def test_hashes_match_written_bytes(store: Path) -> None:
    """digest, md5 and size describe the compressed bytes; diff_id the gunzipped tar."""
    data, info = layer_bytes([str(make_package(store, "aaaa-foo"))])
    assert info.digest == sha(data)
    assert info.md5 == hashlib.md5(data).hexdigest()
    assert info.size == len(data)
    assert info.diff_id == sha(gzip.decompress(data))
    assert info.diff_id != info.digest


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_md5_left_out_on_request(store: Path, compression: str) -> None:
    """Without ``md5`` the layer is the same bytes, digest and diffID, its MD5 not made."""
    path = str(make_package(store, "aaaa-foo"))
    with_md5, without = io.BytesIO(), io.BytesIO()
    full = write_layer([path], with_md5, compression=compression)
    bare = write_layer([path], without, compression=compression, md5=False)
    assert with_md5.getvalue() == without.getvalue()
    assert full.md5 == hashlib.md5(with_md5.getvalue()).hexdigest() and bare.md5 is None
    assert (bare.digest, bare.diff_id, bare.size) == (full.digest, full.diff_id, full.size)


def test_gzip_header_is_deterministic(store: Path) -> None:
    """The gzip header has mtime 0 and no file name, whatever the output file is called."""
    target = store.parent.parent / "named-output.tar.gz"
    with open(target, "wb") as f:
        info = write_layer([str(make_package(store, "aaaa-foo"))], f)
    data = target.read_bytes()
    assert info.digest == sha(data)
    assert data[:3] == b"\x1f\x8b\x08"
    assert data[3] == 0  # no FNAME, no other flags
    assert data[4:8] == b"\x00\x00\x00\x00"  # mtime 0
    assert b"named-output" not in data


def test_compression_level_changes_output(store: Path) -> None:
    """The level parameter is used: level 0 stores, level 9 compresses; both decompress to the same tar."""
    path = str(make_package(store, "aaaa-foo"))
    stored, info0 = layer_bytes([path], level=0)
    best, info9 = layer_bytes([path], level=9)
    assert len(stored) > len(best)
    assert info0.diff_id == info9.diff_id
    with pytest.raises(ValueError):
        layer_bytes([path], level=10)


def test_entry_properties(store: Path) -> None:
    """Entries are sorted, owned by 0:0 without names, mtime 1, with parents first and store modes kept."""
    a = make_package(store, "aaaa-foo")
    prefix = str(store).lstrip("/")
    data, _ = layer_bytes([str(a)])
    entries = members(data)
    names = [m.name for m in entries]
    assert names == sorted(names, key=os.fsencode)
    parts = prefix.split("/")
    parents = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    assert names[: len(parents)] == parents
    assert names[len(parents)] == prefix + "/aaaa-foo"
    for m in entries:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 1)
        assert m.type in (tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE)
        assert not m.pax_headers or set(m.pax_headers) <= {"path", "linkpath", "size"}
    by_name = {m.name: m for m in entries}
    assert by_name[prefix + "/aaaa-foo/bin/aaaa-foo"].mode == 0o555
    assert by_name[prefix + "/aaaa-foo/share/README"].mode == 0o444
    assert by_name[prefix].mode == 0o555 and by_name[prefix].isdir()


def test_parent_entries_written_once(store: Path) -> None:
    """Several paths share one set of parent directory entries."""
    data, _ = layer_bytes([str(make_package(store, "aaaa-foo")), str(make_package(store, "bbbb-bar"))])
    names = [m.name for m in members(data)]
    assert len(names) == len(set(names))
    assert names.count(str(store).lstrip("/")) == 1


def test_raw_tar_has_no_nondeterministic_pax_fields(store: Path) -> None:
    """No atime, ctime or fractional mtime appears in the archive, even in PAX headers."""
    pkg = make_package(store, "aaaa-foo")
    long_dir = pkg / ("d" * 120)
    long_dir.mkdir()
    (long_dir / "f").write_bytes(b"x")
    data, _ = layer_bytes([str(pkg)])
    tar = gzip.decompress(data)
    assert b"atime" not in tar and b"ctime" not in tar and b"mtime=" not in tar
    assert b"uname" not in tar


def test_long_and_unicode_names_round_trip(store: Path) -> None:
    """Names past 100 characters and non-ASCII names come back exactly."""
    pkg = store / "cccc-long"
    deep = pkg / ("x" * 60) / ("y" * 60) / ("z" * 60)
    deep.mkdir(parents=True)
    (deep / "file.txt").write_bytes(b"deep")
    (pkg / "naïve-файл-☃").write_bytes(b"unicode")
    (pkg / ("l" * 150)).symlink_to("t" * 150)
    data, _ = layer_bytes([str(pkg)])
    prefix = str(pkg).lstrip("/")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        long_name = prefix + "/" + "x" * 60 + "/" + "y" * 60 + "/" + "z" * 60 + "/file.txt"
        f = tar.extractfile(long_name)
        assert f is not None and f.read() == b"deep"
        u = tar.extractfile(prefix + "/naïve-файл-☃")
        assert u is not None and u.read() == b"unicode"
        assert tar.getmember(prefix + "/" + "l" * 150).linkname == "t" * 150


def test_symlinks_and_empty_dirs_preserved(store: Path) -> None:
    """Symlinks are stored as symlinks with their target; empty directories are kept."""
    pkg = make_package(store, "aaaa-foo")
    (pkg / "bin" / "abs").symlink_to("/nix/store/zzzz-other/bin/x")
    prefix = str(pkg).lstrip("/")
    by_name = {m.name: m for m in members(layer_bytes([str(pkg)])[0])}
    assert by_name[prefix + "/bin/alias"].issym()
    assert by_name[prefix + "/bin/alias"].linkname == "aaaa-foo"
    assert by_name[prefix + "/bin/abs"].linkname == "/nix/store/zzzz-other/bin/x"
    assert by_name[prefix + "/share/empty"].isdir()


def test_file_contents_round_trip(store: Path) -> None:
    """File contents extract byte for byte, including sizes not a multiple of 512."""
    pkg = make_package(store, "aaaa-foo")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (pkg / "blob").write_bytes(payload)
    with tarfile.open(fileobj=io.BytesIO(layer_bytes([str(pkg)])[0]), mode="r:gz") as tar:
        f = tar.extractfile(str(pkg).lstrip("/") + "/blob")
        assert f is not None and f.read() == payload


def test_single_file_store_path(store: Path) -> None:
    """A store path that is a single file is archived as that file."""
    script = store / "dddd-script.sh"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o555)
    by_name = {m.name: m for m in members(layer_bytes([str(script)])[0])}
    entry = by_name[str(script).lstrip("/")]
    assert entry.isfile() and entry.mode == 0o555 and entry.size == 10


def test_special_files_rejected(store: Path) -> None:
    """A FIFO in a path raises ValueError naming it."""
    pkg = make_package(store, "aaaa-foo")
    os.mkfifo(pkg / "pipe")
    with pytest.raises(ValueError, match="pipe"):
        layer_bytes([str(pkg)])


def test_relative_path_rejected() -> None:
    """Layer paths must be absolute."""
    with pytest.raises(ValueError, match="absolute"):
        layer_bytes(["nix/store/aaaa-foo"])


def test_constant_memory_for_big_file(store: Path) -> None:
    """A 200 MB file is archived with Python allocations staying under 20 MB."""
    pkg = store / "eeee-big"
    pkg.mkdir()
    with open(pkg / "sparse", "wb") as f:
        f.truncate(200 * 1024 * 1024)

    class Discard:
        def write(self, data: bytes) -> int:
            return len(data)

    tracemalloc.start()
    try:
        info = write_layer([str(pkg)], Discard())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024
    assert info.size < 1024 * 1024  # zeros compress well


def test_blob_info() -> None:
    """blob_info hashes in-memory bytes; the diff_id equals the digest."""
    data = b'{"schemaVersion": 2}'
    info = blob_info(data)
    assert info == BlobInfo(sha(data), sha(data), len(data), hashlib.md5(data).hexdigest())


# --- the symlink layer -----------------------------------------------------------


def symlink_layer(roots: list[str], env_target: str | None = None) -> dict[str, tarfile.TarInfo]:
    out = io.BytesIO()
    info = write_symlink_layer(roots, out, env_target=env_target)
    data = out.getvalue()
    assert info.digest == sha(data) and info.diff_id == sha(gzip.decompress(data))
    entries = members(data)
    names = [m.name for m in entries]
    assert names == sorted(names, key=os.fsencode)
    for m in entries:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 1)
    return {m.name: m for m in entries}


def test_symlink_layer_merges_roots(store: Path) -> None:
    """Overlapping bin/ and share/ become real directories holding links into each root."""
    git = make_package(store, "aaaa-git")
    htop = make_package(store, "bbbb-htop")
    (htop / "share" / "man").mkdir()
    (htop / "share" / "man" / "htop.1").write_bytes(b"man")
    tree = symlink_layer([str(htop), str(git)])
    assert tree["bin"].isdir() and tree["bin"].mode == 0o755
    assert tree["share"].isdir() and tree["share/man"].isdir()
    assert tree["share/empty"].isdir()
    assert tree["bin/aaaa-git"].linkname == str(git / "bin" / "aaaa-git")
    assert tree["bin/bbbb-htop"].linkname == str(htop / "bin" / "bbbb-htop")
    assert tree["share/man/htop.1"].linkname == str(htop / "share" / "man" / "htop.1")
    assert tree["tmp"].isdir() and tree["tmp"].mode == 0o1777
    assert "usr" not in tree


def test_symlink_layer_conflict_first_sorted_root_wins(store: Path) -> None:
    """Two roots providing the same file: the first in sorted order wins, whatever the given order."""
    a = make_package(store, "aaaa-one")
    b = make_package(store, "bbbb-two")
    (a / "bin" / "tool").write_bytes(b"a")
    (b / "bin" / "tool").write_bytes(b"b")
    (b / "share" / "README").unlink()
    (b / "share" / "README").mkdir()  # a directory against a file: still the first wins
    for order in ([str(a), str(b)], [str(b), str(a)]):
        tree = symlink_layer(order)
        assert tree["bin/tool"].linkname == str(a / "bin" / "tool")
        assert tree["bin/alias"].linkname == str(a / "bin" / "alias")
        assert tree["share/README"].issym()
    out1, out2 = io.BytesIO(), io.BytesIO()
    write_symlink_layer([str(a), str(b)], out1)
    write_symlink_layer([str(b), str(a)], out2)
    assert out1.getvalue() == out2.getvalue()


def test_symlink_layer_follows_symlinked_directories(store: Path) -> None:
    """A root's symlink to a directory is merged as a directory, not linked."""
    lib = make_package(store, "cccc-lib")
    (lib / "lib").mkdir()
    (lib / "lib" / "libz.so").write_bytes(b"")
    (lib / "lib64").symlink_to("lib")
    other = make_package(store, "dddd-other")
    (other / "lib64").mkdir()
    (other / "lib64" / "libq.so").write_bytes(b"")
    tree = symlink_layer([str(lib), str(other)])
    assert tree["lib64"].isdir()
    assert tree["lib64/libz.so"].linkname == str(lib / "lib64" / "libz.so")
    assert tree["lib64/libq.so"].linkname == str(other / "lib64" / "libq.so")


def test_symlink_layer_survives_directory_cycles(store: Path) -> None:
    """A symlink pointing back up its own tree becomes a link instead of recursing for ever."""
    pkg = make_package(store, "eeee-loop")
    (pkg / "share" / "self").symlink_to("..")
    tree = symlink_layer([str(pkg)])
    assert tree["share/self"].issym()


def test_symlink_layer_usr_bin_env(store: Path) -> None:
    """With env_target the layer holds usr/bin/env pointing at it, in real directories."""
    coreutils = make_package(store, "ffff-coreutils")
    target = str(coreutils / "bin" / "env")
    tree = symlink_layer([str(coreutils)], env_target=target)
    assert tree["usr"].isdir() and tree["usr/bin"].isdir()
    assert tree["usr/bin"].mode == 0o755
    assert tree["usr/bin/env"].issym() and tree["usr/bin/env"].linkname == target


def test_symlink_layer_no_roots() -> None:
    """With no roots the layer still holds tmp/."""
    assert list(symlink_layer([])) == ["tmp"]


def test_zstd_layers_are_deterministic_and_hold_the_same_tar(tmp_path: Path) -> None:
    """A zstd layer is the same bytes every time, and holds exactly the tar the gzip one holds."""
    import zstandard

    tree = tmp_path / "store" / ("z" * 32 + "-pkg")
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n" * 1000)
    outs = []
    for compression in ("zstd", "zstd", "gzip"):
        buf = io.BytesIO()
        info = write_layer([str(tree)], buf, compression=compression)
        outs.append((buf.getvalue(), info))
    (first, one), (second, two), (gz, gzinfo) = outs
    assert first == second and one == two
    assert one.digest == "sha256:" + hashlib.sha256(first).hexdigest()
    tar = zstandard.ZstdDecompressor().decompressobj().decompress(first)
    assert tar == gzip.decompress(gz)
    assert one.diff_id == gzinfo.diff_id != one.digest


# --- hostile package outputs -------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event in ("open", "os.scandir", "os.listdir") and args:
        target = args[0]
        if isinstance(target, (str, bytes)):
            _OPENED.append(os.fsdecode(target))


sys.addaudithook(_audit)


def symlink_layer_reading(roots: list[str], store: Path) -> tuple[dict[str, tarfile.TarInfo], list[str]]:
    """The symlink layer of ``roots``, and every path it opened or listed outside ``store``."""
    global _OPENED
    # The audit hook sees the whole process: a garbage collection in the middle (another
    # test's objects cleaning up their temporary directories) is not the layer's reading.
    gc.collect()
    gc.disable()
    _OPENED = []
    try:
        tree = symlink_layer(roots)
        outside = [p for p in _OPENED if not p.startswith(str(store) + "/")]
    finally:
        _OPENED = None
        gc.enable()
    return tree, outside


def test_links_out_of_the_store_stay_links(store: Path, tmp_path: Path) -> None:
    """`etc -> /etc`, `up -> ../../../var`, a link to the store itself and one to /: each
    stays a link, nothing outside the store is listed or read, and the host's files never
    reach the layer."""
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "shadow").write_text("root:secret")
    pkg = make_package(store, "ffff-hostile")
    (pkg / "etc").symlink_to(host)
    (pkg / "up").symlink_to("../../../" + tmp_path.name)
    (pkg / "all").symlink_to("..")
    (pkg / "slash").symlink_to("/")
    (pkg / "nix").symlink_to(str(store.parent))
    (pkg / "bin" / "escape").symlink_to("../../../../../../../../etc")
    tree, outside = symlink_layer_reading([str(pkg)], store)
    assert outside == []
    for name in ("etc", "up", "all", "slash", "nix", "bin/escape"):
        assert tree[name].issym(), name
        assert tree[name].linkname == str(pkg / name)
    assert not any("shadow" in name for name in tree)
    assert set(tree) == {"bin", "bin/ffff-hostile", "bin/alias", "bin/escape", "share", "share/README",
                         "share/empty", "etc", "up", "all", "slash", "nix", "tmp"}


def test_links_within_the_store_are_merged(store: Path) -> None:
    """openjdk's `bin -> lib/openjdk/bin` merges with another package's real bin/, and an
    absolute link to another store path's directory merges too."""
    jdk = make_package(store, "gggg-jdk")
    shutil.rmtree(jdk / "bin")
    (jdk / "lib" / "openjdk" / "bin").mkdir(parents=True)
    (jdk / "lib" / "openjdk" / "bin" / "java").write_bytes(b"")
    (jdk / "bin").symlink_to("lib/openjdk/bin")
    docs = make_package(store, "hhhh-docs")
    (docs / "share" / "doc").mkdir()
    (docs / "share" / "doc" / "guide").write_bytes(b"")
    git = make_package(store, "iiii-git")
    (git / "share" / "doc").symlink_to(docs / "share" / "doc")
    tree, outside = symlink_layer_reading([str(jdk), str(git)], store)
    assert outside == []
    assert tree["bin"].isdir()
    assert tree["bin/java"].linkname == str(jdk / "bin" / "java")
    assert tree["bin/iiii-git"].linkname == str(git / "bin" / "iiii-git")
    assert tree["share/doc"].isdir()
    assert tree["share/doc/guide"].linkname == str(git / "share" / "doc" / "guide")


def test_link_loops_and_dangling_links(store: Path) -> None:
    """Links that loop or lead nowhere stay links; the layer is still written."""
    pkg = make_package(store, "jjjj-loops")
    (pkg / "a").symlink_to("b")
    (pkg / "b").symlink_to("a")
    (pkg / "self").symlink_to("self")
    (pkg / "gone").symlink_to("nothing/here")
    (pkg / "through-file").symlink_to("share/README/x")
    tree, outside = symlink_layer_reading([str(pkg)], store)
    assert outside == []
    for name in ("a", "b", "self", "gone", "through-file"):
        assert tree[name].issym()


LINK_TARGETS = st.sampled_from([
    "/", "/etc", "/nix", "..", "../..", "../../..", "../../../..", ".", "./", "d", "d/e", "../d",
    "x", "y", "../{other}", "../{other}/d", "{store}", "{store}/", "{store}/{other}", "{store}/../..",
    "{store}/{other}/../../..", "/proc/self/root", "d/../../..", "d/./e/../../x",
])


@settings(max_examples=150, deadline=None)
@given(links=st.lists(st.tuples(st.sampled_from(["x", "y", "d/x", "d/e/y", "l", "d/l"]), LINK_TARGETS),
                      max_size=8))
def test_random_links_never_lead_out(tmp_path_factory: Any, links: list[tuple[str, str]]) -> None:
    """Whatever links two packages hold, the symlink layer reads only inside the store and
    holds only directories and links into the roots."""
    store = tmp_path_factory.mktemp("nix") / "store"
    pkgs = [store / "kkkk-one", store / "llll-two"]
    for pkg in pkgs:
        (pkg / "d" / "e").mkdir(parents=True)
        for name, target in links:
            link = pkg / name
            if not os.path.lexists(link):
                other = pkgs[1].name if pkg == pkgs[0] else pkgs[0].name
                link.symlink_to(target.format(store=store, other=other))
    tree, outside = symlink_layer_reading([str(p) for p in pkgs], store)
    assert outside == []
    for name, member in tree.items():
        assert member.isdir() or member.issym(), name
        if member.issym() and name != "usr/bin/env":
            assert member.linkname.startswith(tuple(str(p) + "/" for p in pkgs)), (name, member.linkname)


PINNED = Path("/tmp/nixeryd-pinned-layer")
"""A fixed place: a layer's entries carry their absolute names, so its digest depends on it."""


@pytest.fixture
def pinned_package() -> Iterator[Path]:
    shutil.rmtree(PINNED, ignore_errors=True)
    pkg = PINNED / "nix" / "store" / ("0" * 32 + "-pinned-1.0")
    (pkg / "bin").mkdir(parents=True)
    (pkg / "bin" / "pinned").write_text("#!/bin/sh\necho pinned\n")
    (pkg / "share").mkdir()
    (pkg / "share" / "data").write_bytes(bytes(range(256)) * 40)
    os.symlink("../bin/pinned", pkg / "share" / "link")
    os.chmod(pkg / "bin" / "pinned", 0o555)
    os.chmod(pkg / "share" / "data", 0o444)
    for directory in (pkg, pkg / "bin", pkg / "share"):
        os.chmod(directory, 0o555)
    yield pkg
    for directory in (pkg, pkg / "bin", pkg / "share"):
        os.chmod(directory, 0o755)
    shutil.rmtree(PINNED)


def test_known_digests_are_pinned(pinned_package: Path) -> None:
    """The same tree gives these digests on every machine, today and after any change: tar
    record padding, headers, ordering and the compressor's output are all in them, so a
    change to any of them (which would change every image's digest) fails here."""
    _, gzipped = layer_bytes([str(pinned_package)])
    assert (gzipped.digest, gzipped.diff_id, gzipped.size) == (
        "sha256:5890268975b5d7eb95e11b7494bb8c668a70c172ce839db6d645fa030eaf4931",
        "sha256:496c0b4a19c14d707ddb4ce1c0f3b73085cb2e1168225b0713db54078569e815", 694)


def test_a_sibling_named_like_the_store_is_outside(tmp_path: Path) -> None:
    """`/nix/storeX` is not in `/nix/store`: a link there leaves the store, and a path
    there is never taken for one inside."""
    from nixeryd.image.symlinks import store_target

    store = tmp_path / "nix" / "store"
    store.mkdir(parents=True)
    sibling = tmp_path / "nix" / "storeX" / "aaaa-evil" / "bin"
    sibling.mkdir(parents=True)
    pkg = store / "bbbb-pkg"
    pkg.mkdir()
    (pkg / "bin").symlink_to(str(sibling))
    (pkg / "lib").mkdir()
    # Cut at the store's length plus one, this link's target names a real store path.
    (tmp_path / "nix" / "storeX" / "bbbb-pkg" / "lib").mkdir(parents=True)
    (pkg / "share").symlink_to(str(tmp_path / "nix" / "storeX" / "bbbb-pkg" / "lib"))
    assert store_target(str(pkg / "bin"), str(store)) is None
    assert store_target(str(pkg / "share"), str(store)) is None
    assert store_target(str(tmp_path / "nix" / "storeX" / "bbbb-pkg" / "lib"), str(store)) is None
    assert store_target(str(pkg / "lib"), str(store)) == str(pkg / "lib")
    tree, outside = symlink_layer_reading([str(pkg)], store)
    assert outside == []
    assert tree["bin"].issym() and tree["bin"].linkname == str(pkg / "bin")


@pytest.fixture
def deep_store() -> Iterator[Path]:
    """A store outside pytest's own temporary directories, removed from the bottom up
    whatever the test does: shutil.rmtree (and so pytest's clean-up) recurses, and fails
    on a tree this deep."""
    root = Path(tempfile.mkdtemp(prefix="nixeryd-deep-"))
    store = root / "nix" / "store"
    store.mkdir(parents=True)
    yield store
    subprocess.run(["find", str(root), "-depth", "-delete"], check=False)


def test_a_package_thousands_of_directories_deep(deep_store: Path) -> None:
    """A package 1,500 directories deep (past Python's recursion limit) is packed and
    merged into the symlink layer like any other (it was a 500 with RecursionError)."""
    pkg = deep_store / "dddd-deep"
    deepest = pkg / "share"
    deepest.mkdir(parents=True)
    for _ in range(1500):  # os.makedirs itself recurses once a directory
        deepest = deepest / "d"
        deepest.mkdir()
    (deepest / "bottom").write_text("reached")
    _, info = layer_bytes([str(pkg)])
    assert info.size > 0
    out = io.BytesIO()
    write_symlink_layer([str(pkg)], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        names = tar.getnames()
    bottom = [n for n in names if n.endswith("/bottom")]
    assert len(bottom) == 1 and bottom[0].count("/d") == 1500


@pytest.mark.parametrize(("change", "word"), [(b"more bytes", "grew"), (None, "shrank")])
def test_a_file_changing_while_packed_fails_the_layer(store: Path, change: bytes | None, word: str) -> None:
    """A file that grows or shrinks between being listed and being copied fails the layer,
    rather than giving a tar whose header and bytes disagree."""
    from nixeryd.image.archive import write_entries
    from nixeryd.image.entries import layer_entries

    pkg = make_package(store, "eeee-changing")
    target = next(p for p in pkg.rglob("*") if p.is_file() and not p.is_symlink())
    original = target.read_bytes()
    assert original
    entries = layer_entries([str(pkg)])
    if change is None:
        target.write_bytes(original[:-1])
    else:
        with open(target, "ab") as f:
            f.write(change)
    with pytest.raises(ValueError, match=word):
        write_entries(entries, io.BytesIO(), None, "gzip")


def test_layers_are_the_same_bytes_on_any_number_of_cores(tmp_path: Path) -> None:
    """A layer of many blocks, gzip and zstd, packed on 1, 2 and 8 threads: the same bytes
    (and so the same digest) every time, and a stream that unpacks to the tar it hashed."""
    import random

    import zstandard

    pkg = tmp_path / "nix" / "store" / ("1" * 32 + "-blocks-1.0")
    pkg.mkdir(parents=True)
    rng = random.Random(7)
    # Compressible and not: about 3 MB, crossing block edges at odd places.
    (pkg / "text").write_bytes(b"".join(rng.choice([b"alpha ", b"beta ", b"gamma\n"]) for _ in range(300_000)))
    (pkg / "noise").write_bytes(rng.randbytes(1_000_003))
    for compression in ("gzip", "zstd"):
        seen = {}
        for workers in (1, 2, 8):
            out = io.BytesIO()
            info = write_layer([str(pkg)], out, compression=compression, workers=workers)
            seen[workers] = (info.digest, out.getvalue())
        assert len({digest for digest, _ in seen.values()}) == 1, compression
        data = seen[1][1]
        tar = gzip.decompress(data) if compression == "gzip" else \
            zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == write_layer(
            [str(pkg)], io.BytesIO(), compression=compression, workers=3).diff_id


@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 3 * BLOCK + 5])
def test_block_edges_make_one_gzip_stream(length: int) -> None:
    """Streams ending before, on and after a block's edge, handed over in odd pieces,
    are gzip that gunzip reads back whole: one member a block begun, never an empty one
    but for an empty stream, the same bytes from one worker as from four."""
    data = bytes((i * 7 + i // 300) % 251 for i in range(length))
    outputs = []
    for workers, piece in ((1, 1000), (4, 77_777)):
        members = GzipMembers(6, workers)
        out = b"".join(members.compress(data[i:i + piece]) for i in range(0, len(data), piece)) + members.flush()
        outputs.append(out)
        assert gzip.decompress(out) == data
        completed = subprocess.run(["gzip", "-dc"], input=out, capture_output=True, check=True)
        assert completed.stdout == data
        # Each member starts with the gzip magic and a header without a name or time.
        assert out.count(b"\x1f\x8b\x08\x00\x00\x00\x00\x00") >= max(1, -(-length // BLOCK))
    assert outputs[0] == outputs[1]


_names = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=130),
    st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s),
    st.sampled_from(["a" * 99, "a" * 100, "b" * 101, "nix/store/" + "c" * 90, "é", "dir/", "x" * 986,
                     "y" * 987, "z" * 989, "u" * 990, "t" * 991, "w" * 9990, "v" * 9991]),
)


@settings(max_examples=1000, deadline=None)
@given(kind=st.sampled_from(["dir", "file", "data", "symlink"]), name=_names, target=_names,
       mode=st.integers(0, 0o177777), owner=st.sampled_from([0, 1000, 8**7 - 1, 8**7, 2**31]),
       size=st.sampled_from([0, 1, 511, 8**11 - 1, 8**11, 2**40]))
def test_headers_made_here_are_tarfile_s_bytes(kind: str, name: str, target: str, mode: int, owner: int,
                                                size: int) -> None:
    """Tar headers made without tarfile (the common case's short way) are byte for byte
    what tarfile writes, for short, long, non-ASCII names and numbers too big for ustar."""
    from nixeryd.image import archive, entries

    entry: entries.Entry
    if kind == "dir":
        entry = entries.Dir(name, mode, owner)
    elif kind == "file":
        entry = entries.File(name, mode, size, "/nonexistent")
    elif kind == "data":
        entry = entries.Data(name, mode, b"x" * (size % 4096))
    else:
        entry = entries.Symlink(name, target)
    assert archive._header(entry) == archive._tarfile_header(entry)


def test_a_layer_packed_beside_another_compresses_on_its_own_thread(tmp_path: Path) -> None:
    """A layer packed alone compresses on every core; one packed while another is being
    packed compresses on its own thread (the cores are busy already, and compression
    workers on top leave the GIL to the assembling threads): the same bytes either way."""
    import random
    import threading

    pkg = tmp_path / "nix" / "store" / ("2" * 32 + "-side-1.0")
    pkg.mkdir(parents=True)
    (pkg / "data").write_bytes(random.Random(3).randbytes(3_000_000))
    started, release = threading.Event(), threading.Event()

    class Holding(io.BytesIO):
        def write(self, data: Any) -> int:
            started.set()
            assert release.wait(60)
            return super().write(data)

    class Watching(io.BytesIO):
        seen: set[str]

        def write(self, data: Any) -> int:
            self.seen |= {thread.name for thread in threading.enumerate()}
            return super().write(data)

    def workers_seen(out: Watching) -> set[str]:
        return {name for name in out.seen if name.startswith("nixeryd-deflate")}

    # A layer that never started (a level out of range) leaves no count of layers packing.
    with pytest.raises(ValueError):
        write_layer([str(pkg)], io.BytesIO(), level=10)
    first = threading.Thread(target=write_layer, args=([str(pkg)], Holding()), kwargs={"workers": 1})
    first.start()
    try:
        assert started.wait(60)
        beside = Watching()
        beside.seen = set()
        write_layer([str(pkg)], beside)
    finally:
        release.set()
        first.join(60)
    assert workers_seen(beside) == set()
    alone = Watching()
    alone.seen = set()
    write_layer([str(pkg)], alone)
    assert len(workers_seen(alone)) == (os.cpu_count() or 1) > 1
    assert alone.getvalue() == beside.getvalue()


def test_entries_walked_a_path_at_a_time_come_in_the_whole_sorted_order(tmp_path: Path) -> None:
    """Paths walked one by one ahead of the packing give exactly the entries, in exactly
    the order, of all of them listed and sorted at once: for store paths, for siblings whose
    names sort around "/" ("x-1", "x.1", "x/1", "x0"), for paths in different parents, and
    for paths one of which is a prefix of another (listed whole then)."""
    from concurrent.futures import ThreadPoolExecutor

    from nixeryd.image.entries import layer_entries, streamed_entries

    root = tmp_path / "t"
    for top in ("nix/store/" + "a" * 32 + "-one", "nix/store/" + "b" * 32 + "-two", "opt/x", "opt/x-1",
                "opt/x.1", "opt/x0", "srv/y"):
        for inner in ("", "/bin", "/bin-x", "/bin.x", "/bin/sub", "/lib0"):
            (root / (top + inner)).mkdir(parents=True, exist_ok=True)
            (root / (top + inner) / "f").write_bytes(b"f")
            (root / (top + inner) / "f-1").write_bytes(b"g")
    cases = [
        ["nix/store/" + "b" * 32 + "-two", "nix/store/" + "a" * 32 + "-one"],
        ["opt/x0", "opt/x.1", "srv/y", "opt/x/bin"],
        ["srv/y", "nix/store/" + "a" * 32 + "-one", "opt/x.1"],
        ["opt/x", "opt/x-1"],  # a prefix of another
        ["opt/x", "opt/x/bin", "opt/x0"],  # inside another
        ["opt/x0", "opt/x0"],
    ]
    with ThreadPoolExecutor(1) as walker:
        for case in cases:
            paths = [str(root / path) for path in case]
            assert list(streamed_entries(paths, walker)) == layer_entries(paths), case

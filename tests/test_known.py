"""Images of known packages are made without Nix, in exactly the bytes Nix would give."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.known import KnownPackages
from nixeryd.build.pkgsource import GitSource, PathSource
from nixeryd.core.offload import inline
from nixeryd.image.manifest import ImageManifests
from nixeryd.image.names import parse_name
from nixeryd.registry.images import Images
from nixeryd.storage.records import Resolution, resolved_key
from tests.fakes import FakeNix, make_store
from tests.memory import MemoryStorage
from tests.test_api import DEPENDENCIES as API_DEPENDENCIES

DEPENDENCIES = {**API_DEPENDENCIES, "gamma": []}
REV = "c" * 40


class Instance:
    """One nixeryd's images over ``storage``, with or without the memory of known names."""

    def __init__(self, nix: FakeNix, storage: MemoryStorage, clock: Clock, source: object,
                 known: bool = True, store_dir: str = "/nix/store") -> None:
        builder = ImageBuilder(nix=nix, storage=storage, offload=inline, source=source,  # type: ignore[arg-type]
                               clock=clock, popularity={},
                               known=KnownPackages(storage, inline, clock, store_dir) if known else None)
        self.images = Images(builder, storage, source, clock, cache_ttl=3600)  # type: ignore[arg-type]


class KnownPackagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store_dir = Path(self.mktemp()).absolute()
        store = make_store(self.store_dir, DEPENDENCIES)
        self.store = store
        self.nix = FakeNix(store, DEPENDENCIES, programs={"alpha": "alpha", "beta": "beta"},
                           licences={"alpha": "MIT"}, revision=REV)
        self.storage = MemoryStorage(now=self.clock.seconds)
        self.source = GitSource("https://git.internal/pkgs.git")
        self.instance = Instance(self.nix, self.storage, self.clock, self.source, store_dir=str(self.store_dir))

    def pull(self, instance: Instance, name: str, tag: str = REV) -> ImageManifests:
        d: Deferred[ImageManifests] = instance.images.manifests(parse_name(name), tag)
        return self.successResultOf(d)

    def from_nix(self, name: str, tag: str = REV) -> ImageManifests:
        """The image as an instance that never saw its names builds it, with Nix."""
        nix = FakeNix(self.store, DEPENDENCIES, programs={"alpha": "alpha", "beta": "beta"},
                      licences={"alpha": "MIT"}, revision=REV)
        fresh = Instance(nix, MemoryStorage(now=self.clock.seconds), self.clock, self.source, known=False)
        made = self.pull(fresh, name, tag)
        self.assertEqual(len(nix.calls), 1)
        return made

    def test_a_new_combination_of_known_names_needs_no_nix(self) -> None:
        """`alpha` and `beta` pulled alone teach every name `run/alpha/beta` and
        `nonroot/beta/alpha` need: those run no Nix, and their manifests, configs and SBOMs
        are byte for byte what Nix's answers give an instance that never saw the names."""
        self.pull(self.instance, "alpha")
        self.pull(self.instance, "beta")
        self.assertEqual(len(self.nix.calls), 2)
        for name in ("run/alpha/beta", "nonroot/beta/alpha"):
            known = self.pull(self.instance, name)
            self.assertEqual(len(self.nix.calls), 2, name)
            built = self.from_nix(name)
            self.assertEqual(known.oci.body, built.oci.body, name)
            self.assertEqual(known.docker.body if known.docker else None,
                             built.docker.body if built.docker else None)
            assert known.sbom is not None and built.sbom is not None
            self.assertEqual(known.sbom.body, built.sbom.body)
            if name.startswith("run/"):
                config = json.loads(self.successResultOf(self.storage.get(
                    "layers/" + json.loads(known.oci.body)["config"]["digest"][7:])) or b"{}")
                self.assertEqual(config["config"]["Entrypoint"], [self.store["alpha"] + "/bin/alpha"])

    def test_an_unknown_name_is_nix_s_alone_and_then_known(self) -> None:
        """One name never resolved: Nix is asked for that name alone, its answer is
        remembered, and the image is what an instance that never saw any name builds."""
        self.pull(self.instance, "alpha")
        made = self.pull(self.instance, "alpha/gamma")
        self.assertEqual(self.nix.calls[1:], [("gamma",)])
        self.assertEqual(made.oci.body, self.from_nix("alpha/gamma").oci.body)
        self.pull(self.instance, "gamma")
        self.assertEqual(len(self.nix.calls), 2)

    def test_an_unknown_name_not_in_the_set_fails_as_a_whole_build_would(self) -> None:
        """Nix asked for the unknown name alone says it is not there, as a whole build would."""
        from nixeryd.build.failures import PackagesNotFound

        self.pull(self.instance, "alpha")
        failure = self.failureResultOf(self.instance.images.manifests(parse_name("alpha/nosuch"), REV),
                                       PackagesNotFound)
        self.assertEqual(self.nix.calls[1:], [("nosuch",)])
        self.assertIn("nosuch", failure.value.message)

    def test_another_package_set_knows_nothing(self) -> None:
        """What names resolved to is per package set: another revision asks Nix."""
        self.pull(self.instance, "alpha")
        self.pull(self.instance, "alpha", tag="d" * 40)
        self.assertEqual(len(self.nix.calls), 2)

    def test_a_path_missing_from_this_host_is_realised_without_evaluation(self) -> None:
        """A store path this host no longer has (collected since) is brought back with
        ``nix-store --realise`` of the known output: no evaluation, the same image."""
        self.pull(self.instance, "alpha")
        self.pull(self.instance, "gamma")
        os.rename(self.store["gamma"], self.store["gamma"] + ".cached")
        made = self.pull(self.instance, "alpha/gamma")
        self.assertEqual(len(self.nix.calls), 2)
        self.assertEqual(self.nix.realised, [(self.store["gamma"],)])
        self.assertEqual(made.oci.body, self.from_nix("alpha/gamma").oci.body)

    def test_a_path_no_cache_has_is_nix_s_to_bring(self) -> None:
        """A missing path Nix cannot realise (no cache has it, no derivation here): Nix
        builds the image whole, and brings the path back."""
        self.pull(self.instance, "alpha")
        self.pull(self.instance, "gamma")
        gone = self.store["gamma"] + ".gone"
        os.rename(self.store["gamma"], gone)
        self.nix.hold = True
        pending: Deferred[ImageManifests] = self.instance.images.manifests(parse_name("alpha/gamma"), REV)
        self.assertEqual(self.nix.realised, [(self.store["gamma"],)])
        self.assertEqual(len(self.nix.calls), 3)
        os.rename(gone, self.store["gamma"])  # what Nix does
        self.nix.release()
        self.successResultOf(pending)

    def test_answers_for_a_moving_package_set_last_the_cache_ttl(self) -> None:
        """A path source moves: what its names resolved to is used for the cache TTL only,
        and answers from different revisions are never mixed."""
        source = PathSource("/srv/pkgs")
        instance = Instance(self.nix, self.storage, self.clock, source, store_dir=str(self.store_dir))
        self.pull(instance, "alpha", "latest")
        self.pull(instance, "beta", "latest")
        self.pull(instance, "alpha/beta", "latest")
        self.assertEqual(len(self.nix.calls), 2)
        self.clock.advance(3601)
        self.pull(instance, "alpha/gamma", "latest")
        self.assertEqual(len(self.nix.calls), 3)
        # beta's answer came from another revision than alpha's new one: Nix answers.
        key = resolved_key("path:/srv/pkgs", "x86_64-linux", "beta")
        record = Resolution.decode(self.successResultOf(self.storage.get(key)))
        assert record is not None
        self.storage.put(key, Resolution(**{**record.__dict__, "revision": "e" * 40,
                                            "recorded": self.clock.seconds()}).encode(), "application/json")
        self.pull(instance, "beta/gamma", "latest")
        self.assertEqual(len(self.nix.calls), 4)

    def test_damaged_answers_are_not_believed(self) -> None:
        """A record that is not a well-formed answer is Nix's to replace."""
        self.pull(self.instance, "alpha")
        for name in ("cacert", "alpha"):
            self.storage.put(resolved_key(f"git:https://git.internal/pkgs.git@{REV}", "x86_64-linux", name),
                             b'{"closure": "nope"}', "application/json")
        self.pull(self.instance, "nonroot/alpha")
        self.assertEqual(len(self.nix.calls), 2)

    def test_gc_removes_answers_not_recorded_within_its_window(self) -> None:
        """What names resolved to is a cache of Nix's answers: gc removes those older than
        its window, and the next pull asks Nix again."""
        from nixeryd.registry.gc import collect

        self.pull(self.instance, "alpha")
        self.clock.advance(3 * 86400)
        self.pull(self.instance, "gamma")
        report = self.successResultOf(Deferred.fromCoroutine(
            collect(self.storage, keep_seconds=86400, now=self.clock.seconds())))
        # alpha and the two base packages: gamma's build asked Nix for gamma alone.
        self.assertEqual(report.removed_resolutions, 3)
        self.pull(self.instance, "nonroot/alpha")
        self.assertEqual(self.nix.calls[2], self.nix.calls[0])
        self.pull(self.instance, "gamma/alpha")
        self.assertEqual(len(self.nix.calls), 3)


class LayoutChangeTests(SynchronousTestCase):
    def test_images_of_an_earlier_layout_are_built_once_more(self) -> None:
        """An image record stored under an earlier layout's key (its layers packed the old
        way) is not served after the layout changes: the first pull builds the image again,
        once, and the pulls after it are served."""
        from nixeryd.registry.cachekeys import IMAGE_LAYOUT, image_cache_key

        clock = Clock()
        store = make_store(Path(self.mktemp()).absolute(), DEPENDENCIES)
        nix = FakeNix(store, DEPENDENCIES)
        storage = MemoryStorage(now=clock.seconds)
        source = GitSource("https://git.internal/pkgs.git")
        image = parse_name("alpha")
        identity = f"git:https://git.internal/pkgs.git@{REV}"
        first = Instance(nix, storage, clock, source, known=False)
        self.successResultOf(first.images.manifests(image, REV))
        current, earlier = image_cache_key(image, identity), image_cache_key(image, identity, IMAGE_LAYOUT - 1)
        self.assertNotEqual(current, earlier)
        record = self.successResultOf(storage.get("manifests/" + current))
        assert record is not None
        # The storage as the earlier version left it: its record under its own key alone.
        storage.put("manifests/" + earlier, record, "application/json")
        self.successResultOf(storage.delete("manifests/" + current))
        upgraded = Instance(nix, storage, clock, source, known=False)
        for _ in range(3):
            self.successResultOf(upgraded.images.manifests(image, REV))
        self.assertEqual(len(nix.calls), 2)
        fresh = Instance(nix, storage, clock, source, known=False)
        self.successResultOf(fresh.images.manifests(image, REV))
        self.assertEqual(len(nix.calls), 2)


def test_layers_are_packed_with_an_md5_only_for_storages_that_check_one(tmp_path: Path) -> None:
    """A filesystem storage checks no MD5: its layers are packed without one (their records
    say null); a storage that checks them (buckets, and the in-memory one here) gets each
    layer's real MD5 in its record."""
    import hashlib

    from nixeryd.storage.filesystem import FilesystemStorage
    from nixeryd.storage.records import LAYERS

    clock = Clock()
    store = make_store(tmp_path / "store", DEPENDENCIES)
    source = GitSource("https://git.internal/pkgs.git")
    memory = MemoryStorage(now=clock.seconds)
    disk = FilesystemStorage(str(tmp_path / "var"), inline)
    for storage in (memory, disk):
        instance = Instance(FakeNix(store, DEPENDENCIES, revision=REV), storage, clock,  # type: ignore[arg-type]
                            source, store_dir=str(tmp_path / "store"))
        d: Deferred[ImageManifests] = instance.images.manifests(parse_name("alpha"), REV)
        assert d.called
    records = [json.loads(data) for key, data in memory._objects.items() if key.startswith(LAYERS + "/")]
    assert records and all(
        r["md5"] == hashlib.md5(memory._objects["layers/" + r["digest"][7:]]).hexdigest() for r in records)
    on_disk = [json.loads(p.read_bytes()) for p in (tmp_path / "var" / LAYERS).iterdir()]
    assert len(on_disk) == len(records)
    # Every store path's layer is packed without an MD5; the symlink layer keeps its own.
    assert sum(r["md5"] is None for r in on_disk) == len(on_disk) - 1


def test_big_layers_are_packed_on_the_packing_threads_small_ones_on_the_others(tmp_path: Path) -> None:
    """Layers of BIG_LAYER bytes or more are packed by the builder's ``packing`` offload
    (niced threads in the daemon); smaller layers, the symlink layer and everything else
    by its ordinary one: a pull of known names, made of small layers, never waits on them."""
    from nixeryd.build.builder import BIG_LAYER
    from nixeryd.core.offload import Offload

    store = make_store(tmp_path / "store", DEPENDENCIES)
    (Path(store["beta"]) / "big").write_bytes(os.urandom(BIG_LAYER))
    calls: dict[str, list[str]] = {"ordinary": [], "packing": []}

    def recording(kind: str) -> Offload:
        def offload(fn: Any, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
            calls[kind].append("layer" if getattr(fn, "__name__", "") == "_write_to" else "other")
            return inline(fn, *args, **kwargs)
        return offload  # type: ignore[return-value]

    clock = Clock()
    storage = MemoryStorage(now=clock.seconds)
    builder = ImageBuilder(nix=FakeNix(store, DEPENDENCIES), storage=storage,  # type: ignore[arg-type]
                           offload=recording("ordinary"), packing=recording("packing"),
                           source=GitSource("https://git.internal/pkgs.git"), clock=clock, popularity={})
    built: list[object] = []
    Deferred.fromCoroutine(builder.build(parse_name("alpha/beta"), REV)).addBoth(built.append)
    assert built and not isinstance(built[0], Failure), built
    assert calls["packing"] == ["layer"]
    assert calls["ordinary"].count("layer") >= 2  # the small layers and the symlink layer

"""The Nix boundary: the process protocol, deadlines, and real nix-build on tests/pkgs."""
from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from nixeryd.build.failures import MAX_MESSAGE, NixBuildFailed, NixTimedOut, PackagesNotFound, tail_text
from nixeryd.build.nix import TAIL_LINES, NixBuild, NixBuilder, NixProcessProtocol
from nixeryd.build.nixoutput import KEPT_LINE, MAX_LINE, MAX_STDOUT, LineAssembler, parse_closure, parse_info
from tests.daemon import git_package_set
from tests.processes import SLEEPER, exited_within

ROOT = Path(__file__).resolve().parent.parent
NIX_DIR = str(ROOT / "nix")
PKGS = str(ROOT / "tests" / "pkgs")
PATH_SOURCE = {"type": "path", "path": PKGS}
SYSTEM = "x86_64-linux"


class FakeProcessTransport:
    """Stands for a spawned process: only its pid is used."""

    pid = 4242


class ProcessReactor(Clock):
    """A Clock that records spawned processes instead of starting them (the OS edge)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[NixProcessProtocol, list[str]]] = []

    def spawnProcess(self, protocol: NixProcessProtocol, executable: str, args: list[str],
                     env: Any = None, usePTY: bool = False) -> FakeProcessTransport:
        self.spawned.append((protocol, list(args)))
        return FakeProcessTransport()


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("build_log"):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_stderr_lines_are_logged_as_they_arrive(self) -> None:
        """Each complete stderr line is logged at once, even split across reads."""
        protocol = NixProcessProtocol("img")
        protocol.errReceived(b"building '/nix/store/a.drv'...\nhal")
        self.assertEqual([e["line"] for e in self.events], ["building '/nix/store/a.drv'..."])
        protocol.errReceived(b"f a line\n")
        self.assertEqual(self.events[-1]["line"], "half a line")
        self.assertEqual(self.events[-1]["image"], "img")

    def test_tail_stdout_and_exit_code(self) -> None:
        """The end result holds stdout, the last 40 stderr lines and the exit code."""
        protocol = NixProcessProtocol("img")
        protocol.outReceived(b"/nix/store/abc-x\n")
        for i in range(100):
            protocol.errReceived(f"line {i}\n".encode())
        protocol.errReceived(b"no newline at the end")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        result = self.successResultOf(protocol.ended)
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(result.stdout, b"/nix/store/abc-x\n")
        self.assertEqual(len(result.tail), 40)
        self.assertEqual(result.tail[-1], "no newline at the end")
        self.assertEqual(result.tail[0], "line 61")

    def test_an_endless_line_is_bounded(self) -> None:
        """8 MB without a newline keeps a bounded head in the tail, the log and the message,
        with a count of what was cut; the lines around it are whole."""
        protocol = NixProcessProtocol("img")
        protocol.errReceived(b"before\n")
        for _ in range(8 * 64):
            protocol.errReceived(b"x" * 16384)
            self.assertLessEqual(protocol._lines._size, MAX_LINE)
        protocol.errReceived(b"\nafter")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        result = self.successResultOf(protocol.ended)
        self.assertEqual(result.tail[0], "before")
        self.assertEqual(result.tail[-1], "after")
        long_line = result.tail[1]
        self.assertLess(len(long_line), KEPT_LINE + 100)
        self.assertTrue(long_line.startswith("x" * KEPT_LINE))
        self.assertTrue(long_line.endswith(f"[{8 * 1024 * 1024 - KEPT_LINE} more bytes]"))
        self.assertTrue(all(len(e["line"]) < KEPT_LINE + 100 for e in self.events))
        self.assertLess(sum(len(line) for line in result.tail), TAIL_LINES * (KEPT_LINE + 100))

    def test_many_long_lines_keep_the_message_short(self) -> None:
        """However long the lines, an error message carries at most a few KB of them."""
        protocol = NixProcessProtocol("img")
        for i in range(100):
            protocol.errReceived(b"%d " % i + b"y" * 100000 + b"\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        text = tail_text(self.successResultOf(protocol.ended).tail)
        self.assertLessEqual(len(text), MAX_MESSAGE + 10)
        self.assertIn("99 yyy", text)  # the end is what is kept

    def test_stdout_is_bounded(self) -> None:
        """Standard output past MAX_STDOUT is not kept, and says so."""
        protocol = NixProcessProtocol("img")
        chunk = b"x" * (1024 * 1024)
        for _ in range(MAX_STDOUT // len(chunk) + 2):
            protocol.outReceived(chunk)
        protocol.processEnded(Failure(ProcessDone(0)))
        result = self.successResultOf(protocol.ended)
        self.assertTrue(result.overflowed)
        self.assertEqual(result.stdout, b"")

    def test_markers_on_stderr_are_only_log(self) -> None:
        """What a builder prints, nixeryd's old markers included, is log and nothing else."""
        protocol = NixProcessProtocol("img")
        protocol.errReceived(b'trace: nixeryd-meta: {"git":{"license":"MIT"}}\n'
                             b'error: nixeryd-not-found: ["nosuch"]\n')
        protocol.processEnded(Failure(ProcessDone(0)))
        result = self.successResultOf(protocol.ended)
        self.assertEqual(result.tail, ('trace: nixeryd-meta: {"git":{"license":"MIT"}}',
                                       'error: nixeryd-not-found: ["nosuch"]'))

    def test_line_assembler(self) -> None:
        """Lines split anywhere come out whole; over-long ones cut with a count; flush gives
        the unfinished last line, or None."""
        lines = LineAssembler(5)
        self.assertEqual(lines.feed(b"ab"), [])
        self.assertEqual(lines.feed(b"c\nde\n\nfghijkl"), [(b"abc", 0), (b"de", 0), (b"", 0)])
        self.assertEqual(lines.feed(b"mn\n"), [(b"fghij", 4)])
        self.assertIsNone(lines.flush())
        self.assertEqual(lines.feed(b"tail"), [])
        self.assertEqual(lines.flush(), (b"tail", 0))

    def test_clean_exit(self) -> None:
        """A clean exit is exit code 0."""
        protocol = NixProcessProtocol("img")
        protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(protocol.ended).exit_code, 0)


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.signals: list[tuple[int, int]] = []
        self.builder = NixBuilder(
            self.reactor, NIX_DIR, {}, timeout=3, deadline=10, kill_grace=5,
            killpg=lambda pid, sig: self.signals.append((pid, sig)),
        )

    def evaluated(self, protocol: NixProcessProtocol, name: str = "hello") -> None:
        """The evaluation of build.nix's info ends, naming one package and its derivation."""
        protocol.outReceived(json.dumps(info(name)).encode())
        protocol.processEnded(Failure(ProcessDone(0)))

    def test_group_gets_term_then_kill(self) -> None:
        """Past the deadline the process group gets SIGTERM, then SIGKILL after the grace."""
        d = ensureDeferred(self.builder.build(PATH_SOURCE, ["hangs"], SYSTEM))
        (evaluation, args), = self.reactor.spawned
        self.assertEqual(args[:5], ["setsid", "setpriv", "--pdeathsig", "TERM", "nix-instantiate"])
        self.assertEqual(args[args.index("-A") + 1], "info")
        self.evaluated(evaluation, "hangs")
        (protocol, args) = self.reactor.spawned[1]
        self.assertEqual(args[4:6], ["nix-store", "--realise"])
        self.assertIn(info("hangs")["drvs"][0], args)
        # NIX_TIMEOUT is Nix's own limit per derivation; the deadline is ours, for all of it.
        self.assertEqual(args[args.index("--timeout") + 1], "3")
        self.reactor.advance(9.9)
        self.assertEqual(self.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        self.reactor.advance(5)
        self.assertEqual(self.signals[-1], (4242, signal.SIGKILL))
        self.assertNoResult(d)
        protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.failureResultOf(d, NixTimedOut)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_one_deadline_for_build_and_closure(self) -> None:
        """The closure query gets what is left of the build's deadline, not a new one."""
        d = ensureDeferred(self.builder.build(PATH_SOURCE, ["hello"], SYSTEM))
        (evaluation, _), = self.reactor.spawned
        self.evaluated(evaluation)
        protocol, _ = self.reactor.spawned[1]
        self.reactor.advance(7)
        protocol.processEnded(Failure(ProcessDone(0)))
        (query, args) = self.reactor.spawned[2]
        self.assertIn("path-info", args)
        self.reactor.advance(3)
        self.assertEqual(self.signals, [(4242, signal.SIGTERM)])
        query.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.failureResultOf(d, NixTimedOut)

    def test_finished_in_time_is_not_killed(self) -> None:
        """A build that ends in time is never signalled and leaves no timer."""
        d = ensureDeferred(self.builder.build(PATH_SOURCE, ["hello"], SYSTEM))
        self.evaluated(self.reactor.spawned[0][0])
        protocol, _ = self.reactor.spawned[1]
        protocol.processEnded(Failure(ProcessDone(0)))
        query, _ = self.reactor.spawned[2]
        root = info("hello")["roots"]["hello"]
        query.outReceived(json.dumps([{"path": root, "narSize": 10, "references": []}]).encode())
        query.processEnded(Failure(ProcessDone(0)))
        build = self.successResultOf(d)
        self.assertEqual(build.roots, (root,))
        self.assertEqual(self.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SubstituterTests(SynchronousTestCase):
    def test_a_nix_that_cannot_say_its_substituters_holds_the_first_build_30_seconds(self) -> None:
        """``nix show-config`` is stopped after SHOW_CONFIG_LIMIT whatever the build's
        deadline; the build then goes on with Nix's substituters as they are."""
        from nixeryd.build.nix import SHOW_CONFIG_LIMIT
        from nixeryd.build.substituters import BinaryCaches
        from nixeryd.core.offload import inline

        reactor, signals = ProcessReactor(), []
        builder = NixBuilder(reactor, NIX_DIR, {}, timeout=3, deadline=3600, kill_grace=5,
                             killpg=lambda pid, sig: signals.append(sig),
                             caches=BinaryCaches(reactor, inline, lambda url, timeout: True))
        ensureDeferred(builder.build(PATH_SOURCE, ["hello"], SYSTEM))
        (shown, args), = reactor.spawned
        self.assertEqual(args[4:6], ["nix", "show-config"])
        reactor.advance(SHOW_CONFIG_LIMIT)
        self.assertEqual(signals, [signal.SIGTERM])
        shown.processEnded(Failure(ProcessTerminated(signal=signal.SIGTERM)))
        self.assertEqual(reactor.spawned[1][1][4], "nix-instantiate")


class OffloadTests(SynchronousTestCase):
    def test_nix_answers_are_parsed_off_the_reactor(self) -> None:
        """build.nix's info and the closure's JSON are parsed through the offload (a thread
        pool in the daemon), not on the reactor thread."""
        from nixeryd.core.offload import inline as run_inline

        reactor = ProcessReactor()
        parsed: list[str] = []

        def counting(fn: Any, *args: Any) -> Deferred[Any]:
            parsed.append(fn.__name__)
            return run_inline(fn, *args)

        builder = NixBuilder(reactor, NIX_DIR, {}, offload=counting, killpg=lambda pid, sig: None)
        d = ensureDeferred(builder.build(PATH_SOURCE, ["hello"], SYSTEM))
        evaluation, _ = reactor.spawned[0]
        evaluation.outReceived(json.dumps(info("hello")).encode())
        evaluation.processEnded(Failure(ProcessDone(0)))
        reactor.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        query, _ = reactor.spawned[2]
        root = info("hello")["roots"]["hello"]  # type: ignore[index]
        query.outReceived(json.dumps([{"path": root, "narSize": 10, "references": []}]).encode())
        query.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual(parsed, ["parse_info", "parse_closure"])


def info(name: str) -> dict[str, object]:
    """build.nix's info for one package, as Nix prints it."""
    return {"notFound": [], "throwing": [], "revision": None, "programs": {name: None}, "meta": {name: {}},
            "roots": {name: f"/nix/store/{'a' * 32}-{name}"}, "drvs": [f"/nix/store/{'d' * 32}-{name}.drv"]}


@pytest.mark.parametrize("change", [
    {"roots": {"git": "/etc/passwd"}},
    {"drvs": ["--option", "builders", "ssh://x"]},
    {"notFound": "git"},
    {"roots": ["/nix/store/" + "a" * 32 + "-git"]},
])
def test_an_answer_of_the_wrong_shape_is_a_failed_build(change: dict[str, object]) -> None:
    """Nix's answer is checked field by field: a path outside the store, an option where a
    derivation goes, a list where a map goes, is a failed build."""
    with pytest.raises(NixBuildFailed):
        parse_info(json.dumps({**info("git"), **change}).encode())


def test_parse_closure_both_shapes() -> None:
    """path-info's list output (Nix 2.8) and object output (newer Nix) read the same."""
    listed = b'[{"path":"/nix/store/a-x","narSize":5,"references":["/nix/store/b-y","/nix/store/a-x"]}]'
    keyed = b'{"/nix/store/a-x":{"narSize":5,"references":["/nix/store/a-x","/nix/store/b-y"]}}'
    assert parse_closure(listed) == parse_closure(keyed)
    info = parse_closure(listed)["/nix/store/a-x"]
    assert info.references == ("/nix/store/a-x", "/nix/store/b-y") and info.nar_size == 5


# Real Nix on the test package set, on the real reactor.

@pytest.fixture
def builder(nix_env: dict[str, str]) -> NixBuilder:
    from twisted.internet import reactor

    return NixBuilder(reactor, NIX_DIR, nix_env, timeout=60, deadline=120, kill_grace=2)


def build(builder: NixBuilder, packages: list[str], source: dict[str, str] = PATH_SOURCE) -> Deferred[NixBuild]:
    return ensureDeferred(builder.build(source, packages, SYSTEM, label="test"))


def names(paths: Any) -> set[str]:
    return {p.split("-", 1)[1] for p in paths}


@pytest_twisted.ensureDeferred
async def test_build_gives_roots_and_closure(builder: NixBuilder) -> None:
    """Roots are the packages' outputs; the closure holds their shared dependencies."""
    result = await build(builder, ["alpha", "beta"])
    assert names(result.roots) == {"alpha-1.0", "beta-2.0"}
    by_name = {p.split("-", 1)[1]: info for p, info in result.closure.items()}
    shared = next(p for p in result.closure if p.endswith("-libshared-1.0"))
    assert shared in by_name["alpha-1.0"].references
    assert shared in by_name["beta-2.0"].references
    assert {"gamma-0.3", "busybox-1.35"} <= set(by_name)
    assert all(info.nar_size > 0 for info in result.closure.values())


@pytest_twisted.ensureDeferred
async def test_name_rules(builder: NixBuilder) -> None:
    """Case-insensitive top level, leading digits, nested sets (with recurseForDerivations),
    and the roots named by the names asked for."""
    asked = ["libx11", "sdl2", "1password", "pythonPackages.requests", "python3packages.requests"]
    result = await build(builder, asked)
    assert names(result.roots) == {"libX11-1.8", "SDL2-2.28", "1password", "python-requests-2.31",
                                   "python3-requests-2.31"}
    assert sorted(result.named) == sorted(asked)
    assert names([result.named["sdl2"]]) == {"SDL2-2.28"}
    assert result.revision is None  # a path has no revision


@pytest_twisted.ensureDeferred
async def test_default_output_only(builder: NixBuilder) -> None:
    """A multi-output package gives its default output, as `nix-build -A` does, not the
    extra outputs meta.outputsToInstall lists (its man page stays out of the image)."""
    result = await build(builder, ["manual-tool"])
    assert names(result.roots) == {"manual-tool-1.0"}
    assert not any(p.endswith("-man") for p in result.closure)
    (root,) = result.roots
    assert (Path(root) / "bin" / "manual-tool").exists()


@pytest_twisted.ensureDeferred
async def test_a_set_taking_system_alone(builder: NixBuilder) -> None:
    """A package set whose function takes `{ system }` alone, without `...`, is called with
    that alone; the system it is given is the image's."""
    source = {"type": "path", "path": PKGS + "/system-only"}
    result = await build(builder, ["team-tool", "cacert"], source)
    assert names(result.roots) == {"team-tool-0.1", "nss-cacert-3.92"}
    script = (Path(result.named["team-tool"]) / "bin" / "team-tool").read_text()
    assert "team-tool for x86_64-linux" in script


@pytest_twisted.ensureDeferred
async def test_nixpkgs_shaped_set_gets_pure_config_and_overlays(nix_env: dict[str, str], tmp_path: Path) -> None:
    """A set taking `{ system, config, overlays, ... }` gets an empty config and no overlays,
    whatever the host's ~/.config/nixpkgs holds."""
    from twisted.internet import reactor

    home = tmp_path / "home"
    (home / ".config" / "nixpkgs").mkdir(parents=True)
    (home / ".config" / "nixpkgs" / "config.nix").write_text("{ allowUnfree = true; }")
    (home / ".config" / "nixpkgs" / "overlays.nix").write_text("[ (self: super: { }) ]")
    impure = NixBuilder(reactor, NIX_DIR, {**nix_env, "HOME": str(home)}, kill_grace=2)
    result = await build(impure, ["config-report"])
    (root,) = result.roots
    assert json.loads((Path(root) / "share" / "config.json").read_text()) == {"config": {}, "overlays": 0}


@pytest_twisted.ensureDeferred
async def test_throwing_attributes_are_unknown_with_nix_message(builder: NixBuilder) -> None:
    """A removed alias (an attribute that throws) and an unfree package (whose drvPath
    throws) are unknown names, with Nix's own message; missing names are listed too."""
    with pytest.raises(PackagesNotFound) as error:
        await build(builder, ["hello", "oldtool", "nosuch"])
    assert error.value.packages == ("oldtool", "nosuch")
    assert "'oldtool' has been removed from the test package set" in error.value.reason
    assert "nixeryd-not-found" not in error.value.reason and "--show-trace" not in error.value.reason
    with pytest.raises(PackagesNotFound) as unfree:
        await build(builder, ["unfreetool"])
    assert unfree.value.packages == ("unfreetool",)
    assert "unfree license" in unfree.value.reason


@pytest_twisted.ensureDeferred
async def test_nix_timeout_stops_one_derivation(nix_env: dict[str, str]) -> None:
    """NIX_TIMEOUT is nix-build's --timeout: a builder past it is stopped by Nix itself,
    reported as timed out, well before the whole build's deadline."""
    from twisted.internet import reactor

    builder = NixBuilder(reactor, NIX_DIR, nix_env, timeout=2, deadline=600, kill_grace=2)
    started = reactor.seconds()
    with pytest.raises(NixTimedOut, match="NIX_TIMEOUT"):
        await build(builder, ["hangs"])
    assert reactor.seconds() - started < 300


@pytest_twisted.ensureDeferred
async def test_unknown_packages_are_all_named(builder: NixBuilder) -> None:
    """Every missing package is named, nested ones included, and known ones are not."""
    with pytest.raises(PackagesNotFound) as error:
        await build(builder, ["hello", "nosuch", "pythonPackages.nosuch", "hello.nosuch"])
    assert error.value.packages == ("nosuch", "pythonPackages.nosuch", "hello.nosuch")


@pytest_twisted.ensureDeferred
async def test_failing_build_reports_nix_output(builder: NixBuilder) -> None:
    """A failing builder is NixBuildFailed with the builder's own words in it."""
    with pytest.raises(NixBuildFailed) as error:
        await build(builder, ["broken"])
    assert "meant to fail" in error.value.message


class Sleepers:
    """Watches Nix's log for the `hangs` package's builder and says its pid, as it starts."""

    def __init__(self) -> None:
        self.started: Deferred[int] = Deferred()

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            found = SLEEPER.search(str(event.get("line", ""))) if event.get("build_log") else None
            if found and not self.started.called:
                self.started.callback(int(found.group(1)))

        self.observer = observe

    def __enter__(self) -> Sleepers:
        globalLogPublisher.addObserver(self.observer)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.observer)


async def gone(pid: int, seconds: float = 30) -> bool:
    """Whether ``pid`` ends within ``seconds``, waited for on a pidfd in a thread."""
    from twisted.internet.threads import deferToThread

    ended: bool = await deferToThread(exited_within, pid, seconds)
    return ended


@pytest_twisted.ensureDeferred
async def test_hanging_build_is_killed_whole(nix_env: dict[str, str]) -> None:
    """A build past its deadline fails with NixTimedOut and leaves no process behind."""
    from twisted.internet import reactor

    builder = NixBuilder(reactor, NIX_DIR, nix_env, timeout=600, deadline=2, kill_grace=2)
    with Sleepers() as sleepers:
        with pytest.raises(NixTimedOut):
            await build(builder, ["hangs"])
        assert sleepers.started.called, "the hanging builder never started"
        assert await gone(await sleepers.started), "the builder outlived its build"


@pytest_twisted.ensureDeferred
async def test_stop_ends_running_builds(builder: NixBuilder) -> None:
    """Stopping the builder (nixeryd shutting down) ends running builds and their builders."""
    with Sleepers() as sleepers:
        pending = build(builder, ["hangs"])
        pid = await sleepers.started
        await builder.stop()
        with pytest.raises(NixBuildFailed, match="shutting down"):
            await pending
        assert await gone(pid), "the builder outlived nixeryd's stop"


@pytest.fixture
def git_pkgs(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A git repository holding the test package set: (url, first revision)."""
    yield git_package_set(tmp_path / "pkgs.git")


@pytest_twisted.ensureDeferred
async def test_git_source_by_ref_and_rev(builder: NixBuilder, git_pkgs: tuple[str, str]) -> None:
    """A git package set builds at a branch, at a revision, and at HEAD, each its own."""
    url, rev = git_pkgs
    at_ref = await build(builder, ["hello"], {"type": "git", "url": url, "ref": "release"})
    at_rev = await build(builder, ["hello"], {"type": "git", "url": url, "rev": rev})
    at_head = await build(builder, ["hello"], {"type": "git", "url": url})
    assert at_rev.roots == at_head.roots
    assert at_ref.roots != at_rev.roots
    (script,) = [Path(r) / "bin" / "hello" for r in at_ref.roots]
    assert "Hello from release" in script.read_text()
    # Nix says which commit it fetched: the revision asked for, or the one HEAD was.
    assert at_rev.revision == rev and at_head.revision == rev
    assert at_ref.revision is not None and at_ref.revision != rev

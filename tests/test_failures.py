"""The end of Nix's output read into the error a person is shown, and the status and
reason phrase each error is answered with. The outputs are Nix 2.8's, as captured."""
from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, fail

from nixeryd.build.failures import (
    BuildersUnavailable,
    NixBuildFailed,
    NixError,
    NixTimedOut,
    PackagesNotFound,
    PlatformUnavailable,
    SourceUnavailable,
    build_failure,
    failure_error,
    failure_record,
)
from nixeryd.http.errors import RegistryError, as_registry_errors, reason_phrase

PATH_SOURCE = {"type": "path", "path": "/srv/pkgs"}
CHANNEL = {"type": "channel", "channel": "nixos-unstable"}
GIT = {"type": "git", "url": "https://user:secret@git.internal/pkgs.git", "ref": "main"}


def classify(tail: list[str], source: dict[str, str] = PATH_SOURCE, *, loaded: bool = True,
             not_found: tuple[str, ...] | None = None) -> NixError:
    return build_failure(tail, source=source, timeout=30, not_found=not_found, source_loaded=loaded)


def test_a_failing_builder_names_its_derivation_and_its_last_line() -> None:
    """A builder that fails is told by its derivation's name and its log's last line,
    without Nix's own lines around it."""
    error = classify([
        "trace: nixeryd-roots: {}",
        "this derivation will be built:",
        "  /nix/store/v75nqihwq3y74pshzrh5ixf9lgbxi1nv-broken-1.0.drv",
        "building '/nix/store/v75nqihwq3y74pshzrh5ixf9lgbxi1nv-broken-1.0.drv'...",
        "configure: checking things",
        "broken-1.0: this package is meant to fail to build",
        "error: builder for '/nix/store/v75nqihwq3y74pshzrh5ixf9lgbxi1nv-broken-1.0.drv' failed with exit code 3",
    ])
    assert isinstance(error, NixBuildFailed)
    assert error.summary == "cannot build broken-1.0: broken-1.0: this package is meant to fail to build"
    assert error.derivation == "/nix/store/v75nqihwq3y74pshzrh5ixf9lgbxi1nv-broken-1.0.drv"
    assert "configure: checking things" in error.message
    assert "trace:" not in error.message


def test_a_log_quoted_below_the_error_is_read_too() -> None:
    """Where Nix quotes the end of the log under its error, that is the log read."""
    error = classify([
        "error: builder for '/nix/store/aaaa-tool-2.0.drv' failed with exit code 2;",
        "       last 10 log lines:",
        "       > make: *** [Makefile:3: all] Error 1",
        "       For full logs, run 'nix log /nix/store/aaaa-tool-2.0.drv'.",
    ])
    assert error.summary == "cannot build tool-2.0: make: *** [Makefile:3: all] Error 1"


def test_a_silent_builder_says_its_exit_code() -> None:
    error = classify(["error: builder for '/nix/store/aaaa-quiet-1.drv' failed with exit code 7"])
    assert error.summary == "cannot build quiet-1: its builder exited with code 7"


def test_an_unloadable_package_set_names_the_source_and_its_settings() -> None:
    """A failure before the package set was loaded is the source's, with what to change."""
    error = classify([
        "warning: error: unable to download 'https://github.com/NixOS/nixpkgs/archive/nixos-unstable.tar.gz': "
        "Couldn't resolve host name (6); retrying in 253 ms",
        "error: unable to download 'https://github.com/NixOS/nixpkgs/archive/nixos-unstable.tar.gz': "
        "Couldn't resolve host name (6)",
        "(use '--show-trace' to show detailed location information)",
    ], CHANNEL, loaded=False)
    assert isinstance(error, SourceUnavailable)
    assert error.summary.startswith("cannot load the package set, nixpkgs channel nixos-unstable (NIXERY_CHANNEL): "
                                    "unable to download 'https://github.com/NixOS/nixpkgs/archive/")
    assert ("NIXERY_CHANNEL (fetched from NIXERY_CHANNEL_URL), NIXERY_PKGS_REPO, NIXERY_PKGS_FLAKE or NIXERY_PKGS_PATH"
            in error.summary)


def test_git_says_why_and_the_url_keeps_no_password() -> None:
    error = classify([
        "fetching Git repository 'https://user:secret@git.internal/pkgs.git'",
        "fatal: unable to access 'https://git.internal/pkgs.git/': Could not resolve host: git.internal",
        "error: program 'git' failed with exit code 128",
    ], GIT, loaded=False)
    assert isinstance(error, SourceUnavailable)
    assert "git repository https://git.internal/pkgs.git at main (NIXERY_PKGS_REPO)" in error.summary
    assert "Could not resolve host: git.internal" in error.summary
    assert "secret" not in error.summary


def test_a_platform_without_a_builder() -> None:
    error = classify([
        "error: a 'aarch64-linux' with features {} is required to build "
        "'/nix/store/168i6q5br3kgdlqgdagwzjjd7j8h9dzc-native-tool-1.0.drv', but I am a 'x86_64-linux' with "
        "features {benchmark, big-parallel, kvm, nixos-test}",
    ])
    assert isinstance(error, PlatformUnavailable)
    assert (error.wanted, error.here) == ("aarch64-linux", "x86_64-linux")
    assert error.summary.startswith("no builder for aarch64-linux: native-tool-1.0 must be built on aarch64-linux")


def test_remote_builders_that_cannot_be_reached() -> None:
    """Nix's words with max-jobs = 0 and its one builder down (Nix 2.8): which machine and
    why, not Nix's guess about system features."""
    error = classify([
        "ssh: connect to host 127.0.0.1 port 2299: Connection refused",
        "cannot build on 'ssh-ng://root@127.0.0.1': error: cannot open connection to remote store "
        "'ssh-ng://root@127.0.0.1': error: unexpected end-of-file",
        "Failed to find a machine for remote build!",
        "derivation: 23sjyxr0brr6g75dlb2j1x10p6alqvwb-probe.drv",
        "required (system, features): (x86_64-linux, )",
        "error: unable to start any build; remote machines may not have all required system features.",
        "       https://nixos.org/manual/nix/stable/advanced-topics/distributed-builds.html",
    ])
    assert isinstance(error, BuildersUnavailable)
    assert error.summary.startswith("no build machine could take the build (ssh-ng://root@127.0.0.1: "
                                    "cannot open connection to remote store")


def test_a_builder_cannot_claim_the_builders_are_down() -> None:
    """A failing builder whose log says a remote builder is down is still a failing builder."""
    error = classify([
        "cannot build on 'ssh-ng://x': error: down",
        "error: builder for '/nix/store/aaaa-broken-1.0.drv' failed with exit code 1",
    ])
    assert isinstance(error, NixBuildFailed) and not isinstance(error, BuildersUnavailable)


def test_a_derivation_past_nix_timeout() -> None:
    error = classify(["hangs-1.0: sleeping for good as pid 12",
                      "error: building of '/nix/store/aaaa-hangs-1.0.drv!out' from .drv file "
                      "timed out after 30 seconds"])
    assert isinstance(error, NixTimedOut)
    assert error.limit == "NIX_TIMEOUT"
    assert error.summary == "building hangs-1.0 took longer than NIX_TIMEOUT (30 seconds) and was stopped"


def test_an_attribute_that_throws_speaks_first() -> None:
    error = classify([
        'trace: nixeryd-not-found: ["youtubedl"]',
        "error: 'youtubedl' has been renamed to/replaced by 'youtube-dl'",
        "(use '--show-trace' to show detailed location information)",
    ], not_found=("youtubedl",))
    assert isinstance(error, PackagesNotFound)
    assert error.summary == "'youtubedl' has been renamed to/replaced by 'youtube-dl'"
    assert error.packages == ("youtubedl",)


async def answered(error: Exception) -> RegistryError:
    pending: Deferred[None] = fail(error)
    with pytest.raises(RegistryError) as raised:
        await as_registry_errors("image", pending)
    return raised.value


@pytest.mark.parametrize(("error", "status", "retry"), [
    (PackagesNotFound("packages not found: nosuch", "", ["nosuch"]), 404, False),
    (PackagesNotFound("'old' has been removed", "", ["old"], "error: 'old' has been removed"), 422, False),
    (NixBuildFailed("cannot build broken-1.0: it broke\nmore"), 422, False),
    (PlatformUnavailable("no builder for aarch64-linux", "", "aarch64-linux", "x86_64-linux"), 422, False),
    (NixTimedOut("building x took longer than NIX_TIMEOUT", limit="NIX_TIMEOUT", seconds=30), 503, True),
    (SourceUnavailable("cannot load the package set"), 503, True),
    (BuildersUnavailable("no build machine could take the build"), 503, True),
])
def test_statuses(error: NixError, status: int, retry: bool) -> None:
    """A failure of the name is a 4xx; one that asking later can cure is a 503 with
    Retry-After. Either way the reason phrase is the message's first line."""
    result = Deferred.fromCoroutine(answered(error))
    got: list[RegistryError] = []
    result.addCallback(got.append)
    (answer,) = got
    assert answer.status == status
    assert (answer.retry_after is not None) == retry
    assert answer.phrase() == error.message.split("\n")[0].encode()
    assert json.loads(answer.body())["errors"][0]["message"] == error.message


def test_reason_phrase_cannot_carry_a_header() -> None:
    """Control characters never reach the status line, and it stays short."""
    assert reason_phrase("a\r\nSet-Cookie: x\x00y") == b"a"
    assert reason_phrase("bad\rline\x7fhere") == b"bad line here"
    long = reason_phrase("é" * 1000)
    assert len(long) <= 400 and long.endswith(b"...")
    long.decode("utf-8")


@pytest.mark.parametrize("error", [
    NixBuildFailed("cannot build a: b\nlog", "log", "cannot build a: b", "/nix/store/x-a.drv"),
    NixTimedOut("past it\nlog", "log", "past it", "NIX_TIMEOUT", 30.0),
    SourceUnavailable("cannot load", "log"),
    BuildersUnavailable("no build machine", "log"),
    PlatformUnavailable("no builder", "log", "aarch64-linux", "x86_64-linux"),
    PackagesNotFound("'old' is gone", "log", ["old"], "error: 'old' is gone"),
])
def test_a_failure_recorded_for_the_fleet_comes_back_the_same(error: NixError) -> None:
    """Another instance raises the same kind of error, with the same summary and message."""
    again = failure_error(json.loads(json.dumps(failure_record(error))))
    assert type(again) is type(error)
    assert (again.message, again.summary) == (error.message, error.summary)


def test_a_summary_quotes_a_short_line() -> None:
    """A builder's endless line is quoted in a summary in a few hundred characters."""
    error = classify(["x" * 1024 + " [8387584 more bytes]",
                      "error: builder for '/nix/store/aaaa-loud-1.0.drv' failed with exit code 1"])
    assert len(error.summary) < 300 and error.summary.endswith("[...]")


@pytest.mark.parametrize("lie", [
    "error: building of '/nix/store/aaaa-x-1.drv!out' from .drv file timed out after 3 seconds",
    "error: a 'aarch64-linux' with features {} is required to build '/nix/store/aaaa-x-1.drv', but I am a "
    "'x86_64-linux' with features {}",
])
def test_a_builder_cannot_pass_its_failure_off_as_another(lie: str) -> None:
    """Only Nix's closing errors are read: a builder printing Nix's words for a time-out or a
    missing platform, then failing, is a failing builder (422), not a 503 or UNSUPPORTED."""
    error = classify([
        "building '/nix/store/bbbb-liar-1.0.drv'...",
        lie,
        "liar-1.0: giving up",
        "error: builder for '/nix/store/bbbb-liar-1.0.drv' failed with exit code 1",
    ])
    assert type(error) is NixBuildFailed
    assert error.summary == "cannot build liar-1.0: liar-1.0: giving up"
    quoted = classify([
        "error: builder for '/nix/store/bbbb-liar-1.0.drv' failed with exit code 1;",
        "       last 10 log lines:",
        "       > " + lie,
    ])
    assert type(quoted) is NixBuildFailed

"""The test helpers leave no process behind, whatever a test does: the guarantee every
end-to-end test leans on, checked with a real pytest run of its own."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import ROOT
from tests.processes import exited_within

INNER_CONFTEST = "from tests.processes import pytest_sessionfinish, stop_leftovers  # noqa: F401\n"

INNER_TESTS = '''
import os
from pathlib import Path

from tests.daemon import Daemon, daemon_environment

PIDS = Path(os.environ["PIDS"])


def test_a_second_daemon_fails_to_start(tmp_path):
    first = Daemon(tmp_path / "a", daemon_environment(tmp_path / "a")).start()
    PIDS.write_text(str(first.process.pid))
    Daemon(tmp_path / "b", daemon_environment(tmp_path / "b", NIXERY_LAYER_BUDGET="none")).start()


def test_the_first_one_was_stopped():
    pid = int(PIDS.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError(f"daemon {pid} is still running")
'''


def test_a_failed_start_after_another_leaks_nothing(pytester: pytest.Pytester, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A test whose second daemon fails to start still has its first daemon stopped."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=300)
    result.assert_outcomes(failed=1, passed=1)
    assert "nixeryd did not start" in result.stdout.str()
    assert "NIXERY_LAYER_BUDGET" in result.stdout.str()


def test_a_killed_test_run_leaves_no_daemon(tmp_path: Path) -> None:
    """When the process that started a daemon is killed outright, the daemon goes too."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.daemon import Daemon, daemon_environment\n"
        f"d = Daemon(Path({str(tmp_path / 's')!r}), daemon_environment(Path({str(tmp_path / 's')!r}))).start()\n"
        "print(d.process.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not exited_within(pid, 0), "the daemon should be running"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert exited_within(pid, 30), f"daemon {pid} outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()

"""Durability of the filesystem backend, seen from the kernel: every object is fsynced
before the rename that makes it visible, and its directory after. Traced with strace,
so that what is checked is what the process really asks of the kernel."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from tests.daemon import ROOT

SCRIPT = """
import sys
from nixeryd.core.blobs import blob_info
from nixeryd.core.offload import inline
from nixeryd.storage.filesystem import FilesystemStorage

storage = FilesystemStorage(sys.argv[1], inline)
storage.put("builds/" + "a" * 64, b"{}", "application/json")
staged = storage.staging_path()
with open(staged, "wb") as f:
    f.write(b"blob bytes")
storage.commit_blob(staged, blob_info(b"blob bytes"))
"""


def traced_calls(root: Path) -> list[tuple[str, str]]:
    """(call, path) of every fsync and rename the script makes, in order."""
    result = subprocess.run(
        ["strace", "-y", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", SCRIPT, str(root)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    calls = []
    for line in result.stderr.splitlines():
        sync = re.match(r"f(?:data)?sync\(\d+<([^>]*)>\)\s+= 0", line)
        if sync:
            calls.append(("fsync", sync.group(1)))
        renamed = re.match(r'rename(?:at2?)?\(.*?"([^"]+)",.*?"([^"]+)".*\)\s+= 0', line)
        if renamed:
            calls.append(("rename", renamed.group(2)))
    return calls


def test_objects_are_fsynced_before_and_after_they_appear(tmp_path: Path) -> None:
    """put and commit_blob: the file is fsynced before its rename, the directory after."""
    root = tmp_path / "store"
    calls = traced_calls(root)
    record = str(root / "builds" / ("a" * 64))
    blob = str(root / "layers" / hashlib.sha256(b"blob bytes").hexdigest())
    for target, directory in ((record, str(root / "builds")), (blob, str(root / "layers"))):
        renamed = calls.index(("rename", target))
        before = calls[renamed - 1]
        assert before[0] == "fsync" and "/staging/" in before[1], (target, calls)
        assert ("fsync", directory) in calls[renamed + 1:], (target, calls)

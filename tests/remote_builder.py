"""A Nix remote builder on this machine, as a fleet's builders are reached: an sshd on
loopback (Debian's, unpacked by ``make install`` into ``build/sshd``) in a mount namespace
of its own, where ``/nix`` is the builder's own store (a directory of the test's), so what
is built there is not in this host's store until Nix copies it back. Nix reaches it with
``builders = ssh-ng://…``, as any remote builder; only its address is loopback."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from tests.daemon import ROOT, free_port
from tests.processes import die_with_parent, register, unregister

SSHD = ROOT / "build" / "sshd" / "usr" / "sbin" / "sshd"


class RemoteBuilder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.store = root / "nix" / "store"
        self.process: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []
        (root / "nix").mkdir(parents=True)
        (root / "conf").mkdir()
        # The builder's own Nix settings: as this host's test settings, and no caches.
        (root / "conf" / "nix.conf").write_text(
            "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command\n")
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        # sshd's privilege separation user, in this namespace's /etc/passwd alone.
        (root / "passwd").write_text(Path("/etc/passwd").read_text() + "sshd:x:74:65534::/run/sshd:/usr/sbin/nologin\n")
        (root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{self.port}\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile none\nSetEnv NIX_CONF_DIR={root / 'conf'} PATH=/usr/bin:/bin\n")

    @property
    def nix_config(self) -> str:
        """Nix settings sending every build to this builder: this host builds nothing."""
        return (f"builders = ssh-ng://root@127.0.0.1 x86_64-linux {self.root / 'client_key'} 2 1\n"
                "builders-use-substitutes = true\nmax-jobs = 0\n")

    @property
    def ssh_options(self) -> str:
        """``NIX_SSHOPTS``: the port, and a host key this test made a moment ago."""
        return f"-p {self.port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

    def start(self) -> RemoteBuilder:
        script = (f"mount --bind {self.root / 'nix'} /nix && mount -t tmpfs tmpfs /run && mkdir /run/sshd && "
                  f"mount --bind {self.root / 'passwd'} /etc/passwd && "
                  f"exec {SSHD} -D -e -f {self.root / 'sshd_config'}")
        self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        preexec_fn=die_with_parent())
        register(self)
        listening = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip()
                self.output.append(line)
                if "Server listening" in line:
                    listening.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 30
        while not listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the builder's sshd did not start:\n" + "\n".join(self.output))
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        unregister(self)

    def built(self, name: str) -> list[str]:
        """Store paths of the builder's own store whose names end with ``name``."""
        return sorted(p for p in os.listdir(self.store) if p.endswith("-" + name)) if self.store.exists() else []

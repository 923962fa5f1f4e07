"""The ``nixeryd`` command: runs the registry in the foreground.

``nixeryd [twistd options for nixeryd]`` is ``twistd --nodaemon --pidfile= nixeryd``.
"""
from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["nixeryd", "--nodaemon", "--pidfile=", "nixeryd", *args]
    run()


if __name__ == "__main__":
    main()

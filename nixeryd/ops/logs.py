"""Logs for journald: one JSON object per line on standard output.

Use it with ``twistd --logger nixeryd.ops.logs.json_lines``. Each line holds the
time, level, namespace and formatted message, plus the stable keys that
nixeryd's events carry (image, tag, cache_key, layer, digest, backend,
exit_code) and, for lines of Nix's own output, ``build_log: true``.
"""
from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer

STABLE_KEYS = ("image", "tag", "cache_key", "layer", "digest", "backend", "exit_code", "build_log")


@implementer(ILogObserver)
class JSONLines:
    """Writes each event as one line of JSON."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key in STABLE_KEYS:
            if key in event:
                value = event[key]
                record[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def json_lines() -> ILogObserver:
    """The observer factory twistd's ``--logger`` option names."""
    return JSONLines(sys.stdout)

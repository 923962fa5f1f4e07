"""One list of settings (nixeryd/settings.py): what config reads is in it, what it lists
is read, `nixeryd settings` prints it (the book's settings page is made from it: see
test_book), and every option names a listed setting."""
from __future__ import annotations

import re
import subprocess

import pytest

from nixeryd.config import Config
from nixeryd.settings import NAMES, READABLE, SETTINGS, reference
from nixeryd.tap import Options
from tests.daemon import ROOT

READ = re.compile(r'\b(?:get|parsed|raw)\(\s*"((?:NIX|NIXERY|GCS|S3|AWS|STORAGE|GOOGLE|PORT|LISTEN)[A-Z0-9_]*)"')


def read_in_code() -> set[str]:
    return {name for path in (ROOT / "nixeryd").rglob("*.py") for name in READ.findall(path.read_text())}


def test_what_the_code_reads_is_listed() -> None:
    assert read_in_code() <= READABLE, read_in_code() - READABLE


def test_what_is_listed_is_read() -> None:
    ours = {name for setting in SETTINGS if not setting.read_by_others for name in setting.names}
    assert ours <= read_in_code(), ours - read_in_code()


def test_reading_a_setting_not_listed_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check guards every read, not only those the static test sees."""
    from nixeryd import config

    monkeypatch.setattr(config, "READABLE", READABLE - {"NIX_TIMEOUT"})
    with pytest.raises(KeyError, match="NIX_TIMEOUT is read but not listed"):
        Config.from_env({}, cwd="/")


def test_the_command_prints_the_list() -> None:
    shown = subprocess.run([str(ROOT / ".venv" / "bin" / "nixeryd"), "settings"], capture_output=True, text=True,
                           check=True)
    assert shown.stdout == reference()


def test_every_option_names_a_listed_setting() -> None:
    options = Options()
    for long_name, _, _, help_text in options.optParameters:
        (variable,) = re.findall(r"\(([A-Z][A-Z0-9_]+)\)", help_text)
        assert variable in NAMES
        row = next(s for s in SETTINGS if variable in s.names)
        assert f"--{long_name}" in row.option, (long_name, row.option)


def test_every_documented_default_is_the_default() -> None:
    """Setting a variable to the default the book gives it changes nothing: the book's
    defaults are the code's (most are parsed from the book's own text)."""
    import dataclasses

    from nixeryd.settings import documented_default

    def settings(environ: dict[str, str]) -> Config:
        return dataclasses.replace(Config.from_env(environ, cwd="/srv", cpu_count=2), child_environment={})

    unset = settings({})
    checked = []
    for name in sorted(NAMES):
        try:
            value = documented_default(name)
        except KeyError:
            continue  # not a value: the number of cores, the bundled nix/, an SDK's chain
        assert settings({name: value}) == unset, name
        checked.append(name)
    assert len(checked) >= 20, checked

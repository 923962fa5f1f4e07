"""Settings from the environment, and their errors."""
from __future__ import annotations

import pytest

from nixeryd.build.pkgsource import ChannelSource, GitSource, PathSource
from nixeryd.config import Config, ConfigError


def test_defaults() -> None:
    """An empty environment gives the documented defaults."""
    config = Config.from_env({}, cwd="/srv", cpu_count=8)
    assert config.listen == ("tcp:8080",)
    assert config.source == ChannelSource("nixos-unstable")
    assert (config.storage_backend, config.storage_path) == ("filesystem", "/srv/var")
    assert (config.nix_timeout, config.layer_budget, config.cache_ttl) == (60, 94, 21600)
    assert config.base_packages == ("cacert", "iana-etc")
    assert (config.max_builds, config.build_queue) == (8, 64)
    assert (config.build_deadline, config.failure_ttl) == (3600, 60)
    assert (config.storage_connect_timeout, config.storage_deadline, config.storage_cooldown) == (5, 15, 10)
    assert (config.signing_service_account, config.iam_endpoint) == (None, "https://iamcredentials.googleapis.com")


def test_every_variable() -> None:
    """Each variable sets its setting."""
    env = {
        "PORT": "9000", "NIXERY_PKGS_REPO": "https://git.internal/p.git",
        "STORAGE_PATH": "data", "NIX_TIMEOUT": "2.5", "NIX_POPULARITY_URL": "pop.json",
        "NIXERY_BASE_PACKAGES": "cacert zlib, openssl", "NIXERY_LAYER_BUDGET": "10",
        "NIXERY_CACHE_TTL": "60", "NIXERY_MAX_BUILDS": "3", "NIXERY_BUILD_QUEUE": "0",
        "NIXERY_NIX_DIR": "/opt/nix", "NIXERY_BUILD_DEADLINE": "7200", "NIXERY_FAILURE_TTL": "0",
        "NIXERY_STORAGE_CONNECT_TIMEOUT": "2", "NIXERY_STORAGE_DEADLINE": "30", "NIXERY_STORAGE_COOLDOWN": "5",
        "NIXERY_SIGNING_ACCOUNT": "sa@p.iam.gserviceaccount.com", "NIXERY_IAM_ENDPOINT": "https://iam.internal/",
    }
    config = Config.from_env(env, cwd="/srv")
    assert config.listen == ("tcp:9000",)
    assert config.source == GitSource("https://git.internal/p.git")
    assert config.storage_path == "/srv/data"
    assert config.nix_timeout == 2.5 and config.popularity_url == "pop.json"
    assert config.base_packages == ("cacert", "zlib", "openssl")
    assert (config.layer_budget, config.cache_ttl, config.max_builds, config.build_queue) == (10, 60, 3, 0)
    assert config.nix_dir == "/opt/nix"
    assert (config.build_deadline, config.failure_ttl) == (7200, 0)
    assert (config.storage_connect_timeout, config.storage_deadline, config.storage_cooldown) == (2, 30, 5)
    assert config.signing_service_account == "sa@p.iam.gserviceaccount.com"
    assert config.iam_endpoint == "https://iam.internal"
    assert config.child_environment["PORT"] == "9000"


def test_path_source_and_empty_base() -> None:
    """A relative package path is made absolute; an empty base list means none."""
    config = Config.from_env({"NIXERY_PKGS_PATH": "pkgs", "NIXERY_BASE_PACKAGES": ""}, cwd="/srv")
    assert config.source == PathSource("/srv/pkgs") and config.base_packages == ()


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "65536"}, "PORT"),
        ({"NIX_TIMEOUT": "abc"}, "NIX_TIMEOUT"),
        ({"NIX_TIMEOUT": "0"}, "NIX_TIMEOUT"),
        ({"NIX_TIMEOUT": "inf"}, "NIX_TIMEOUT"),
        ({"NIXERY_STORAGE_BACKEND": "s3"}, "NIXERY_STORAGE_BACKEND"),
        ({"NIXERY_STORAGE_BACKEND": "gcs"}, "GCS_BUCKET"),
        ({"NIXERY_LAYER_BUDGET": "1"}, "NIXERY_LAYER_BUDGET"),
        ({"NIXERY_LAYER_BUDGET": "126"}, "NIXERY_LAYER_BUDGET"),
        ({"NIXERY_CACHE_TTL": "-5"}, "NIXERY_CACHE_TTL"),
        ({"NIXERY_MAX_BUILDS": "0"}, "NIXERY_MAX_BUILDS"),
        ({"NIXERY_BUILD_QUEUE": "-1"}, "NIXERY_BUILD_QUEUE"),
        ({"NIXERY_BASE_PACKAGES": "ok, ${evil}"}, "NIXERY_BASE_PACKAGES"),
        ({"NIXERY_PKGS_REPO": "r", "NIXERY_PKGS_PATH": "p"}, "NIXERY_PKGS_REPO, NIXERY_PKGS_PATH"),
        ({"NIXERY_CHANNEL": "nixos-23.05", "NIXERY_PKGS_REPO": "r"}, "NIXERY_CHANNEL, NIXERY_PKGS_REPO"),
        ({"NIXERY_CHANNEL": "c", "NIXERY_PKGS_PATH": "p"}, "NIXERY_CHANNEL, NIXERY_PKGS_PATH"),
        ({"NIX_TIMEOUT": "0.5"}, "NIX_TIMEOUT"),
        ({"NIXERY_BUILD_DEADLINE": "0"}, "NIXERY_BUILD_DEADLINE"),
        ({"NIXERY_BUILD_DEADLINE": "soon"}, "NIXERY_BUILD_DEADLINE"),
        ({"NIXERY_FAILURE_TTL": "-1"}, "NIXERY_FAILURE_TTL"),
        ({"NIXERY_FAILURE_TTL": "nan"}, "NIXERY_FAILURE_TTL"),
        ({"NIXERY_STORAGE_DEADLINE": "0"}, "NIXERY_STORAGE_DEADLINE"),
        ({"NIXERY_STORAGE_CONNECT_TIMEOUT": "30"}, "NIXERY_STORAGE_CONNECT_TIMEOUT"),
        ({"NIXERY_STORAGE_COOLDOWN": "-1"}, "NIXERY_STORAGE_COOLDOWN"),
        ({"NIXERY_SIGNING_ACCOUNT": "a@b", "GCS_SIGNING_KEY": "k.pem", "GCS_SIGNING_ACCOUNT": "a@b"},
         "NIXERY_SIGNING_ACCOUNT"),
        ({"GCS_SIGNING_KEY": "k.pem"}, "GCS_SIGNING_ACCOUNT"),
        ({"GCS_SIGNING_ACCOUNT": "a@b"}, "GCS_SIGNING_KEY"),
        ({"NIXERY_SIGNED_URL_TTL": "0"}, "NIXERY_SIGNED_URL_TTL"),
        ({"NIXERY_SIGNED_URL_TTL": "604801"}, "NIXERY_SIGNED_URL_TTL"),
        ({"NIXERY_PLATFORMS": "linux/amd64,windows/amd64"}, "NIXERY_PLATFORMS"),
        ({"NIXERY_CHANNEL_URL": "mirror.internal/{channel}.tar.gz"}, "NIXERY_CHANNEL_URL"),
        ({"NIXERY_SIGNING_KEY": "k.pem"}, "NIXERY_SIGNING_IDENTITY"),
        ({"NIXERY_SIGNING_KEY": "k.pem", "NIXERY_SIGNING_IDENTITY": "https://registry.internal"},
         "NIXERY_SIGNING_IDENTITY"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    """A bad setting is a one-line ConfigError naming the variable."""
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    message = str(error.value)
    assert variable in message and "\n" not in message


def test_overrides_are_checked() -> None:
    """Overrides replace settings and obey the same rules."""
    config = Config.from_env({})
    assert config.with_overrides(listen=("tcp:1",)).listen == ("tcp:1",)
    with pytest.raises(ConfigError):
        config.with_overrides(layer_budget=500)


def test_gcs_settings() -> None:
    """The GCS backend's settings: bucket, signing key, URL validity, emulator with scheme."""
    config = Config.from_env(
        {
            "NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "images", "GCS_SIGNING_KEY": "k.pem",
            "GCS_SIGNING_ACCOUNT": "nixeryd@p.iam.gserviceaccount.com",
            "NIXERY_SIGNED_URL_TTL": "600", "STORAGE_EMULATOR_HOST": "localhost:9023",
            "NIXERY_PLATFORMS": "linux/amd64, linux/arm64",
        },
        cwd="/srv",
    )
    assert (config.storage_backend, config.gcs_bucket) == ("gcs", "images")
    assert config.gcs_signing_key == "/srv/k.pem"
    assert config.signed_url_ttl == 600
    assert config.storage_emulator_host == "http://localhost:9023"
    assert [a.oci for a in config.platforms] == ["amd64", "arm64"]


def test_socket_activation() -> None:
    """With sockets from systemd and no PORT, nixeryd listens on the first of them."""
    assert Config.from_env({"LISTEN_FDS": "1"}).listen == ("systemd:domain=INET:index=0",)
    assert Config.from_env({"LISTEN_FDS": "1", "PORT": "9000"}).listen == ("tcp:9000",)


def test_path_recheck() -> None:
    """NIXERY_PATH_RECHECK: how often a path source is walked; zero walks at every pull."""
    assert Config.from_env({}).path_recheck == 1.0
    assert Config.from_env({"NIXERY_PATH_RECHECK": "0"}).path_recheck == 0.0
    with pytest.raises(ConfigError, match="NIXERY_PATH_RECHECK"):
        Config.from_env({"NIXERY_PATH_RECHECK": "-1"})


def test_signing_identities() -> None:
    """NIXERY_SIGNING_IDENTITY: one host or several, comma-separated, with ports and paths."""
    config = Config.from_env({"NIXERY_SIGNING_KEY": "k.pem",
                              "NIXERY_SIGNING_IDENTITY": "registry.internal:8080, registry.internal/team/"})
    assert config.image_signing_identity == ("registry.internal:8080", "registry.internal/team")


@pytest.mark.parametrize("variable, value, expected", [
    ("NIX_TIMEOUT", "soon", "NIX_TIMEOUT"),
    ("NIXERY_HTPASSWD", "/nonexistent/htpasswd", "NIXERY_HTPASSWD: cannot read"),
    ("NIXERY_NIX_DIR", "/nonexistent", "NIXERY_NIX_DIR: no build.nix"),
])
def test_options_check_settings_before_anything_is_wired(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: object,
) -> None:
    """``twistd nixeryd``'s options read and check the settings (``postOptions``): a bad one
    ends there with one line naming it, before ``makeService`` wires a part; good ones are
    handed to ``makeService`` as ``options.settings``."""
    from nixeryd.tap import Options

    monkeypatch.setenv("STORAGE_PATH", str(tmp_path))
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        Options().parseOptions([])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nixeryd: ") and expected in err[0], err
    monkeypatch.delenv(variable)
    options = Options()
    options.parseOptions(["--nix-timeout", "7"])
    assert options.settings.nix_timeout == 7

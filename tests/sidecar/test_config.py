"""Settings: cast and validated once from an injected environ, overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlockd.config import Config, Settings, port_number
from unlockd.errors import InvalidInputError


def test_settings_empty_environ_defaults():
    """With no variables the defaults of the spec apply."""
    settings = Settings.from_environ({"XDG_CACHE_HOME": "/xdg"})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8600
    assert settings.upstream_url == "http://127.0.0.1:8700"
    assert settings.cdn_url is None
    assert settings.cache_dir == Path("/xdg/unlockd/models")
    assert settings.archive is None
    assert settings.archive_key_id == "images"
    assert settings.api_token is None
    assert settings.max_upload is None
    assert settings.small_size == 4096
    assert settings.loopback


def test_settings_environ_values_cast():
    """Every UNLOCKD_* variable is read and cast to its type."""
    settings = Settings.from_environ(
        {
            "UNLOCKD_HOST": "192.0.2.1",
            "UNLOCKD_PORT": "9000",
            "UNLOCKD_UPSTREAM_URL": "https://hub.example:8443/",
            "UNLOCKD_CDN_URL": "http://cdn.local",
            "UNLOCKD_CACHE_DIR": "/var/cache/m",
            "UNLOCKD_ARCHIVE": "/opt/images.enc",
            "UNLOCKD_ARCHIVE_KEY_ID": "imgs-2",
            "UNLOCKD_API_TOKEN": "s3cret",
            "UNLOCKD_MAX_UPLOAD": "1000",
            "UNLOCKD_SMALL_SIZE": "40",
            "DOCKER_HOST": "tcp://127.0.0.1:2375",
        }
    )
    assert settings.host == "192.0.2.1"
    assert not settings.loopback
    assert settings.port == 9000
    assert settings.upstream_url == "https://hub.example:8443"
    assert settings.cdn_url == "http://cdn.local"
    assert settings.cache_dir == Path("/var/cache/m")
    assert settings.archive == Path("/opt/images.enc")
    assert settings.archive_key_id == "imgs-2"
    assert settings.api_token == "s3cret"
    assert settings.max_upload == 1000
    assert settings.small_size == 40
    assert settings.docker_host == "tcp://127.0.0.1:2375"


def test_settings_override_wins_over_environ():
    """A flag value wins over its variable; None overrides are ignored."""
    settings = Settings.from_environ(
        {"UNLOCKD_PORT": "9000", "UNLOCKD_HOST": "::1"}, port=9001, host=None, cache_dir="/c"
    )
    assert settings.port == 9001
    assert settings.host == "::1"
    assert settings.loopback
    assert settings.cache_dir == Path("/c")


def test_settings_empty_variable_ignored():
    """An empty variable counts as unset."""
    assert Settings.from_environ({"UNLOCKD_API_TOKEN": ""}).api_token is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"UNLOCKD_PORT": "x"}, "UNLOCKD_PORT: expected an integer, got 'x'"),
        ({"UNLOCKD_PORT": "70000"}, "UNLOCKD_PORT: expected an integer between 0 and 65535"),
        ({"UNLOCKD_UPSTREAM_URL": "ftp://x"}, "UNLOCKD_UPSTREAM_URL: expected an http://"),
        ({"UNLOCKD_CDN_URL": "http://h:99999"}, "UNLOCKD_CDN_URL: invalid port"),
        ({"UNLOCKD_SMALL_SIZE": "39"}, "UNLOCKD_SMALL_SIZE: expected an integer >= 40"),
        ({"UNLOCKD_MAX_UPLOAD": "0"}, "UNLOCKD_MAX_UPLOAD: expected an integer >= 1"),
        ({"UNLOCKD_ARCHIVE_KEY_ID": "a/b"}, "invalid UNLOCKD_ARCHIVE_KEY_ID"),
        ({"UNLOCKD_HOST": "  "}, "UNLOCKD_HOST: expected a non-empty string"),
        ({"UNLOCKD_CDN_CONNECTIONS": "0"}, "UNLOCKD_CDN_CONNECTIONS: expected an integer between"),
        (
            {"UNLOCKD_CDN_PART_SIZE": "4096"},
            "UNLOCKD_CDN_PART_SIZE: expected an integer >= 1048576",
        ),
        ({"UNLOCKD_CDN_STALL_TIMEOUT": "0"}, "UNLOCKD_CDN_STALL_TIMEOUT: expected a positive"),
        ({"UNLOCKD_CDN_STALL_TIMEOUT": "nan"}, "UNLOCKD_CDN_STALL_TIMEOUT: expected a positive"),
    ],
)
def test_settings_bad_value_error_names_key(environ, message):
    """A bad value raises InvalidInputError whose message names the variable."""
    with pytest.raises(InvalidInputError, match="^" + message.replace("?", r"\?")):
        Settings.from_environ(environ)


def test_settings_cdn_transfer_values_cast():
    """The CDN transfer settings come from their variables, flags winning, with their types."""
    environ = {"UNLOCKD_CDN_CONNECTIONS": "16", "UNLOCKD_CDN_STALL_TIMEOUT": "2.5"}
    settings = Settings.from_environ(environ, cdn_part_size="4194304")
    assert (settings.cdn_connections, settings.cdn_part_size) == (16, 4 << 20)
    assert settings.cdn_stall_timeout == 2.5
    defaults = Settings.from_environ({})
    assert (defaults.cdn_connections, defaults.cdn_part_size) == (8, 8 << 20)
    assert defaults.cdn_stall_timeout == 10.0


def test_settings_bad_override_error_names_flag():
    """A bad override names its command-line flag."""
    with pytest.raises(InvalidInputError, match=r"^--port: expected an integer"):
        Settings.from_environ({}, port="abc")


def test_settings_unknown_override_rejected():
    """A misspelt override is a programming error."""
    with pytest.raises(TypeError, match="prot"):
        Settings.from_environ({}, prot=1)


def test_settings_are_frozen():
    """Settings cannot change after validation."""
    settings = Settings.from_environ({})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "flag"), [("upstream_url", "--upstream"), ("cdn_url", "--cdn")]
)
def test_settings_bad_url_override_names_the_real_flag(override, flag):
    """A bad --upstream or --cdn names that flag, not one built from the setting's name."""
    with pytest.raises(InvalidInputError, match=f"^{flag}: expected an http"):
        Settings.from_environ({}, **{override: "ftp://x"})


def test_settings_integer_errors_share_one_style_with_the_hub():
    """Sidecar and hub integer settings fail with the same message style."""
    from unlockd.hub import HubSettings  # noqa: PLC0415

    with pytest.raises(InvalidInputError, match=r"^UNLOCKD_PORT: expected an integer between"):
        Settings.from_environ({"UNLOCKD_PORT": "70000"})
    with pytest.raises(InvalidInputError, match=r"^UNLOCKD_HUB_PORT: expected an integer between"):
        HubSettings.from_environ({"UNLOCKD_HUB_PORT": "70000"})


@pytest.mark.parametrize("url", ["ftp://user:pw-secret@host", "user:pw-secret@host"])
def test_settings_url_with_credentials_error_hides_them(url):
    """A bad URL holding a password is refused without echoing the password."""
    with pytest.raises(InvalidInputError, match=r"^UNLOCKD_UPSTREAM_URL: ") as caught:
        Settings.from_environ({"UNLOCKD_UPSTREAM_URL": url})
    assert "pw-secret" not in str(caught.value)


def test_settings_bad_api_token_error_hides_it():
    """An --api-token that is rejected is not echoed."""
    with pytest.raises(InvalidInputError, match=r"^--api-token: ") as caught:
        Settings.from_environ({}, api_token=123456789)
    assert "123456789" not in str(caught.value)


def test_config_flag_wins_default_and_required():
    """Config reads a flag over its variable, falls back to the default, and names a missing one."""
    config = Config({"UNLOCKD_X": "7", "UNLOCKD_EMPTY": ""}, {"--x": None, "--y": "9"})
    assert config("UNLOCKD_X", port_number, flag="--x") == 7
    assert config("UNLOCKD_X", port_number, flag="--y") == 9
    assert config("UNLOCKD_EMPTY", port_number, 5) == 5
    with pytest.raises(InvalidInputError, match=r"^--z or UNLOCKD_Z: required$"):
        config("UNLOCKD_Z", port_number, flag="--z")


def test_settings_built_in_code_validated_naming_the_field():
    """Settings built in code are checked too, the error naming the field."""
    with pytest.raises(InvalidInputError, match=r"^small_size: expected an integer >= 40"):
        Settings(small_size=8)

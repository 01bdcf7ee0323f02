"""HubSettings: environment variables, flag overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlockd.errors import InvalidInputError
from unlockd.hub import HubSettings
from unlockd.hub.config import default_data_dir


def test_settings_from_environ_reads_every_variable():
    """Each UNLOCKD_HUB_* variable lands in its field."""
    settings = HubSettings.from_environ(
        {
            "UNLOCKD_HUB_HOST": "192.0.2.1",
            "UNLOCKD_HUB_PORT": "9000",
            "UNLOCKD_HUB_DATA_DIR": "/srv/hub",
            "UNLOCKD_HUB_TOKEN_TTL": "60",
            "UNLOCKD_HUB_UPLOAD_TTL": "120",
        }
    )
    assert settings == HubSettings(Path("/srv/hub"), "192.0.2.1", 9000, 60, 120)


def test_settings_from_environ_flags_win_and_none_is_ignored():
    """Non-None overrides beat the environment; None means "flag not given"."""
    settings = HubSettings.from_environ(
        {"UNLOCKD_HUB_PORT": "9000", "UNLOCKD_HUB_TOKEN_TTL": "60"},
        port=9100,
        token_ttl=None,
        data_dir="/srv/x",
    )
    assert (settings.port, settings.token_ttl, settings.data_dir) == (9100, 60, Path("/srv/x"))


def test_settings_from_environ_without_data_dir_uses_xdg():
    """Without a data dir the XDG data home is used."""
    settings = HubSettings.from_environ({"XDG_DATA_HOME": "/data"})
    assert settings.data_dir == Path("/data/unlockd/hub")
    assert default_data_dir({}).parts[-3:] == ("share", "unlockd", "hub")
    assert (settings.host, settings.port, settings.token_ttl, settings.upload_ttl) == (
        "127.0.0.1",
        8700,
        3600,
        3600,
    )


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"UNLOCKD_HUB_PORT": "eighty"}, "UNLOCKD_HUB_PORT"),
        ({"UNLOCKD_HUB_PORT": "70000"}, "UNLOCKD_HUB_PORT"),
        ({"UNLOCKD_HUB_TOKEN_TTL": "0"}, "UNLOCKD_HUB_TOKEN_TTL"),
        ({"UNLOCKD_HUB_UPLOAD_TTL": "-5"}, "UNLOCKD_HUB_UPLOAD_TTL"),
    ],
)
def test_settings_from_environ_bad_value_names_the_key(environ, key):
    """A bad value is rejected with the variable's name in the message."""
    with pytest.raises(InvalidInputError, match=key):
        HubSettings.from_environ({"UNLOCKD_HUB_DATA_DIR": "/d", **environ})


def test_settings_bad_override_is_rejected():
    """Overrides are validated too; an unknown one is a programming error, as for the sidecar."""
    with pytest.raises(InvalidInputError, match=r"^--token-ttl: expected an integer >= 1, got 0$"):
        HubSettings.from_environ({}, data_dir="/d", token_ttl=0)
    with pytest.raises(TypeError, match="colour"):
        HubSettings.from_environ({}, data_dir="/d", colour="blue")

"""Settings of the hub, validated once from flags and ``UNLOCKD_HUB_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlockd.config import (
    Config,
    Setting,
    at_least,
    path,
    port_number,
    read_settings,
    text,
    validate_settings,
)
from unlockd.errors import InvalidInputError
from unlockd.hub.database import database_url

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["HubSettings", "default_data_dir", "resolve_data_dir"]


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_DATA_HOME/unlockd/hub`` (``~/.local/share/unlockd/hub`` without it)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "unlockd" / "hub"


def database(key: str, value: object) -> str:
    """A ``postgresql://`` or ``sqlite:///ABS/PATH`` URL; errors never show its password."""
    if not isinstance(value, str) or not value.strip():
        msg = f"{key}: expected a database URL"
        raise InvalidInputError(msg)
    try:
        database_url(value.strip())
    except InvalidInputError as exc:
        msg = f"{key}: {exc.message}"
        raise InvalidInputError(msg) from None
    if "://" not in value:
        msg = f"{key}: expected postgresql://USER[:PASS]@HOST[:PORT]/DB or sqlite:///ABS/PATH"
        raise InvalidInputError(msg)
    return value.strip()


def blobs(key: str, value: object) -> str:
    """``s3://BUCKET[/PREFIX]`` or a directory (``~`` expanded)."""
    location = text(key, value)
    if location.startswith("s3://"):
        bucket = location.removeprefix("s3://").partition("/")[0]
        if not bucket:
            msg = f"{key}: expected s3://BUCKET[/PREFIX], got {location!r}"
            raise InvalidInputError(msg)
        return location
    if "://" in location:
        msg = f"{key}: expected s3://BUCKET[/PREFIX] or a directory, got {location!r}"
        raise InvalidInputError(msg)
    return str(Path(location).expanduser())


@dataclasses.dataclass(frozen=True, slots=True)
class HubSettings:
    """Where the hub keeps its data, where it listens and how long tokens and uploads live.

    ``database`` and ``blobs`` default to SQLite and a directory under ``data_dir``.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8700
    token_ttl: int = 3600
    upload_ttl: int = 3600
    database: str | None = dataclasses.field(default=None, repr=False)
    blobs: str | None = None
    presign_ttl: int = 3600

    def __post_init__(self) -> None:
        validate_settings(self, _HUB)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> HubSettings:
        """Build settings from ``UNLOCKD_HUB_*`` variables; non-None ``overrides`` win.

        Raises :class:`~unlockd.errors.InvalidInputError` naming the variable or flag of a
        bad value.
        """
        values = read_settings(environ, _HUB, overrides)
        values.setdefault("data_dir", default_data_dir(environ))
        return cls(**values)

    @property
    def database_url(self) -> str:
        """The database: ``database``, else SQLite in the data dir."""
        return self.database or f"sqlite:///{self.data_dir.absolute() / 'hub.sqlite3'}"

    @property
    def uses_data_dir(self) -> bool:
        """Whether anything lives in ``data_dir`` (not with a remote database and bucket)."""
        remote_db = self.database is not None and not self.database.startswith("sqlite")
        remote_blobs = self.blobs is not None and self.blobs.startswith("s3://")
        return not (remote_db and remote_blobs)


def resolve_data_dir(environ: Mapping[str, str], override: object = None) -> Path:
    """The data dir: ``override`` (a flag) if given, else ``UNLOCKD_HUB_DATA_DIR``, else default."""
    config = Config(environ, {"--data-dir": override})
    setting = _HUB["data_dir"]
    data_dir: Path | None = config(setting.variable, setting.cast, None, flag=setting.flag)
    return default_data_dir(environ) if data_dir is None else data_dir


def resolve_database(environ: Mapping[str, str], override: object = None) -> str | None:
    """The database URL: ``override`` (a flag), else ``UNLOCKD_HUB_DATABASE``, else None."""
    config = Config(environ, {"--database": override})
    setting = _HUB["database"]
    url: str | None = config(setting.variable, setting.cast, None, flag=setting.flag)
    return url


_HUB = {
    "data_dir": Setting("UNLOCKD_HUB_DATA_DIR", path, "--data-dir"),
    "host": Setting("UNLOCKD_HUB_HOST", text),
    "port": Setting("UNLOCKD_HUB_PORT", port_number),
    "token_ttl": Setting("UNLOCKD_HUB_TOKEN_TTL", at_least(1)),
    "upload_ttl": Setting("UNLOCKD_HUB_UPLOAD_TTL", at_least(1)),
    "database": Setting("UNLOCKD_HUB_DATABASE", database),
    "blobs": Setting("UNLOCKD_HUB_BLOBS", blobs),
    "presign_ttl": Setting("UNLOCKD_HUB_PRESIGN_TTL", at_least(1)),
}

"""The sidecar's settings: one value object, cast and validated once, from an injected environ."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from unlockd.errors import InvalidInputError
from unlockd.models import validate_name

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Settings", "default_cache_dir", "http_url", "integer"]

_MIN_SMALL_SIZE = 40  # the small part must hold at least the Tink header


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """Return ``$XDG_CACHE_HOME/unlockd/models`` (``~/.cache`` when unset)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unlockd" / "models"


@dataclass(frozen=True)
class Settings:
    """Everything ``unlockd serve`` needs to know; build it with :meth:`from_environ`."""

    host: str = "127.0.0.1"
    port: int = 8600
    upstream_url: str = "http://127.0.0.1:8700"
    cdn_url: str | None = None
    cache_dir: Path = field(default_factory=lambda: default_cache_dir({}))
    archive: Path | None = None
    archive_key_id: str = "images"
    api_token: str | None = field(default=None, repr=False)
    max_upload: int | None = None
    small_size: int = 4096
    docker_host: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``UNLOCKD_*`` variables; an override that is not None wins.

        Overrides are keyed by field name (``port=8601``), as the command line passes them.
        Raises :class:`InvalidInputError` naming the variable or flag of a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(overrides) - names):
            msg = f"unknown settings: {', '.join(unknown)}"
            raise TypeError(msg)
        values: dict[str, Any] = {"cache_dir": default_cache_dir(environ)}
        for name, (variable, cast) in _SOURCES.items():
            override = overrides.get(name)
            if override is not None:
                values[name] = cast(_FLAGS.get(name, f"--{name.replace('_', '-')}"), override)
            elif (raw := environ.get(variable)) is not None and raw != "":
                values[name] = cast(variable, raw)
        return cls(**values)

    @property
    def loopback(self) -> bool:
        """True when the bind address only accepts local connections."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        msg = f"{key}: expected a non-empty string, got {value!r}"
        raise InvalidInputError(msg)
    return value.strip()


def _secret(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        msg = f"{key}: expected a non-empty string"  # never echo a secret
        raise InvalidInputError(msg)
    return value


def integer(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Cast ``value`` to an int within bounds; the error names ``key`` (a variable or flag)."""
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
    if number is None:
        msg = f"{key}: expected an integer, got {value!r}"
        raise InvalidInputError(msg)
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        msg = f"{key}: expected an integer {bounds}, got {number}"
        raise InvalidInputError(msg)
    return number


def _port(key: str, value: object) -> int:
    return integer(key, value, 0, 65535)


def _small_size(key: str, value: object) -> int:
    return integer(key, value, _MIN_SMALL_SIZE)


def _max_upload(key: str, value: object) -> int:
    return integer(key, value, 1)


def http_url(key: str, value: object) -> str:
    """Validate an http(s) URL without a trailing slash; the error names ``key``."""
    text = _text(key, value)
    parts = urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        msg = f"{key}: expected an http:// or https:// URL, got {text!r}"
        raise InvalidInputError(msg)
    if "@" in parts.netloc:
        # httpx would send them as Basic auth in place of our bearer token, and they would
        # show up wherever the URL is printed.
        msg = f"{key}: credentials in the URL are not supported"
        raise InvalidInputError(msg)
    try:
        parts.port  # noqa: B018 - urlsplit validates the port only when it is read
    except ValueError as exc:
        msg = f"{key}: invalid port in {text!r}"
        raise InvalidInputError(msg) from exc
    return text.rstrip("/")


def _key_id(key: str, value: object) -> str:
    return validate_name(_text(key, value), key)


def _path(key: str, value: object) -> Path:
    if isinstance(value, Path):
        return value.expanduser()
    return Path(_text(key, value)).expanduser()


# Fields whose flag is not the field's name (the rest are ``--field-name``).
_FLAGS = {"upstream_url": "--upstream", "cdn_url": "--cdn"}

_SOURCES: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "host": ("UNLOCKD_HOST", _text),
    "port": ("UNLOCKD_PORT", _port),
    "upstream_url": ("UNLOCKD_UPSTREAM_URL", http_url),
    "cdn_url": ("UNLOCKD_CDN_URL", http_url),
    "cache_dir": ("UNLOCKD_CACHE_DIR", _path),
    "archive": ("UNLOCKD_ARCHIVE", _path),
    "archive_key_id": ("UNLOCKD_ARCHIVE_KEY_ID", _key_id),
    "api_token": ("UNLOCKD_API_TOKEN", _secret),
    "max_upload": ("UNLOCKD_MAX_UPLOAD", _max_upload),
    "small_size": ("UNLOCKD_SMALL_SIZE", _small_size),
    "docker_host": ("DOCKER_HOST", _text),
}

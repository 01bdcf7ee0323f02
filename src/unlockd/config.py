"""Settings of the sidecar and the hub: typed, validated once, read from an injected environ.

One mechanism for both, in the style of starlette's ``Config``: a :class:`Config` reads each
variable through a cast, a command-line flag given for it wins, and an error names the flag or
the variable that was wrong, never the value of a secret::

    config = Config(environ, flags={"--port": args.port})
    port = config("UNLOCKD_PORT", port_number, 8600, flag="--port")

A settings class (:class:`Settings` here, ``HubSettings`` for the hub) is a frozen dataclass
whose defaults are its fields' defaults; a table of :class:`Setting` gives each field its
variable, cast and flag, :func:`read_settings` reads them, and :func:`validate_settings`
casts values built in code, with errors naming the field.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from unlockd.binary_split import DEFAULT_SMALL_SIZE, MIN_SMALL_SIZE
from unlockd.blobs import DEFAULT_STALL_TIMEOUT
from unlockd.cache import DEFAULT_CONNECTIONS, DEFAULT_PART_SIZE
from unlockd.errors import InvalidInputError
from unlockd.models import validate_name

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "Cast",
    "Config",
    "DiskSpace",
    "Limits",
    "Setting",
    "Settings",
    "at_least",
    "between",
    "default_cache_dir",
    "disk_space",
    "http_url",
    "integer",
    "limit_settings",
    "name",
    "path",
    "port_number",
    "read_password",
    "read_settings",
    "seconds",
    "secret",
    "text",
    "validate_settings",
]

T = TypeVar("T")
D = TypeVar("D")

# A cast takes the name to blame (a variable, flag or field) and a raw value.
Cast = Callable[[str, object], T]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_REQUIRED: Any = _Marker("REQUIRED")  # no default: Config raises
_UNSET: Any = _Marker("UNSET")  # read_settings' default: the field keeps its own


class Config:
    """Typed values from ``environ`` (a variable set to "" counts as unset) and from ``flags``.

    ``flags`` maps a flag (``"--port"``) to the value the command line gave it, None when it
    was not given.
    """

    def __init__(
        self, environ: Mapping[str, str], flags: Mapping[str, object] | None = None
    ) -> None:
        self.environ = environ
        self.flags = flags or {}

    def __call__(
        self, variable: str, cast: Cast[T], default: D = _REQUIRED, *, flag: str | None = None
    ) -> T | D:
        """Return ``flag``'s value if given, else ``variable``'s, cast; else ``default``.

        Raises :class:`InvalidInputError` naming the flag or variable of a bad value, and
        naming both when neither is set and there is no default.
        """
        if flag is not None and (value := self.flags.get(flag)) is not None:
            return cast(flag, value)
        if (raw := self.environ.get(variable)) is not None and raw != "":
            return cast(variable, raw)
        if default is _REQUIRED:
            source = variable if flag is None else f"{flag} or {variable}"
            msg = f"{source}: required"
            raise InvalidInputError(msg)
        return default


@dataclass(frozen=True, slots=True)
class Setting:
    """Where one field of a settings class comes from: its variable, cast and flag."""

    variable: str
    cast: Cast[Any]
    flag: str | None = None


def read_settings(
    environ: Mapping[str, str], table: Mapping[str, Setting], overrides: Mapping[str, object]
) -> dict[str, Any]:
    """Return the fields of ``table`` that are set, by field name, as :class:`Config` reads them.

    ``overrides`` are the command line's values keyed by field name (``port=8601``), None for
    a flag not given; a field absent from the result keeps its dataclass default. An unknown
    override is a programming error: TypeError.
    """
    if unknown := sorted(set(overrides) - set(table)):
        msg = f"unknown settings: {', '.join(unknown)}"
        raise TypeError(msg)
    config = Config(environ, {_flag(name, s): overrides.get(name) for name, s in table.items()})
    values = {
        name: config(s.variable, s.cast, _UNSET, flag=_flag(name, s)) for name, s in table.items()
    }
    return {name: value for name, value in values.items() if value is not _UNSET}


def validate_settings(settings: object, table: Mapping[str, Setting]) -> None:
    """Cast the fields of a frozen dataclass built in code; errors name the field."""
    for name, setting in table.items():
        value = getattr(settings, name)
        if value is not None:
            object.__setattr__(settings, name, setting.cast(name, value))


def _flag(name: str, setting: Setting) -> str:
    return setting.flag or f"--{name.replace('_', '-')}"


# -- casts: (key, value) -> typed value, InvalidInputError naming key -----------------------


def text(key: str, value: object) -> str:
    """A non-empty string, stripped."""
    if not isinstance(value, str) or not value.strip():
        msg = f"{key}: expected a non-empty string, got {value!r}"
        raise InvalidInputError(msg)
    return value.strip()


def secret(key: str, value: object) -> str:
    """A non-empty string kept as is; the error never shows it."""
    if not isinstance(value, str) or not value:
        msg = f"{key}: expected a non-empty string"
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


def between(minimum: int, maximum: int) -> Cast[int]:
    """A cast to an integer from ``minimum`` to ``maximum``."""

    def cast(key: str, value: object) -> int:
        return integer(key, value, minimum, maximum)

    return cast


def at_least(minimum: int) -> Cast[int]:
    """A cast to an integer ``>= minimum``."""

    def cast(key: str, value: object) -> int:
        return integer(key, value, minimum)

    return cast


def seconds(key: str, value: object) -> float:
    """A positive duration in seconds (a float)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf") or isinstance(value, bool):
        msg = f"{key}: expected a positive number of seconds, got {value!r}"
        raise InvalidInputError(msg)
    return number


def disk_space(key: str, value: object) -> DiskSpace:
    """A byte count (``1000000000``) or a percentage of a filesystem (``10%``)."""
    if isinstance(value, DiskSpace):
        return value
    raw = str(value).strip()
    if isinstance(value, bool) or not (match := _DISK_SPACE.fullmatch(raw)):
        msg = f"{key}: expected a byte count or a percentage such as 10%, got {value!r}"
        raise InvalidInputError(msg)
    if match["percent"]:
        percent = float(match["number"])
        if percent > 100:
            msg = f"{key}: a percentage must be at most 100%, got {raw}"
            raise InvalidInputError(msg)
        return DiskSpace(percent=percent)
    if "." in match["number"]:
        msg = f"{key}: a byte count must be a whole number, got {raw}"
        raise InvalidInputError(msg)
    return DiskSpace(size=int(match["number"]))


# Digits bounded: a byte count fits in 20 of them, and int() of thousands of digits is slow.
_DISK_SPACE = re.compile(r"(?P<number>\d{1,20}(?:\.\d{1,6})?)\s*(?P<percent>%?)", re.ASCII)


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """An amount of disk space: ``size`` bytes, or ``percent`` of the filesystem's size."""

    size: int | None = None
    percent: float | None = None

    def bytes_of(self, total: int) -> int:
        """The amount in bytes on a filesystem of ``total`` bytes."""
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.size or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.size} bytes"


def port_number(key: str, value: object) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    return integer(key, value, 0, 65535)


def path(key: str, value: object) -> Path:
    """A filesystem path, ``~`` expanded."""
    if isinstance(value, Path):
        return value.expanduser()
    return Path(text(key, value)).expanduser()


def name(key: str, value: object) -> str:
    """A resource or key name (see :func:`unlockd.models.validate_name`)."""
    return validate_name(text(key, value), key)


def http_url(key: str, value: object) -> str:
    """An http(s) URL without a trailing slash, and without credentials."""
    url = text(key, value)
    parts = urlsplit(url)
    # Shown in errors only without a userinfo part: "user:password@" is a secret.
    shown = repr(url) if "@" not in url else "a URL with '@' (not shown)"
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        msg = f"{key}: expected an http:// or https:// URL, got {shown}"
        raise InvalidInputError(msg)
    if "@" in parts.netloc:
        # httpx would send them as Basic auth in place of our bearer token, and they would
        # show up wherever the URL is printed.
        msg = f"{key}: credentials in the URL are not supported"
        raise InvalidInputError(msg)
    try:
        parts.port  # noqa: B018 - urlsplit validates the port only when it is read
    except ValueError as exc:
        msg = f"{key}: invalid port in {shown}"
        raise InvalidInputError(msg) from exc
    return url.rstrip("/")


# -- the sidecar --------------------------------------------------------------------------


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
    small_size: int = DEFAULT_SMALL_SIZE
    docker_host: str | None = None
    # Also the free space that cache eviction keeps (SPEC §12); /ready checks it.
    cache_min_free: DiskSpace = DiskSpace(percent=10)
    cdn_connections: int = DEFAULT_CONNECTIONS
    cdn_part_size: int = DEFAULT_PART_SIZE
    cdn_stall_timeout: float = DEFAULT_STALL_TIMEOUT
    cache_max_bytes: int | None = None

    def __post_init__(self) -> None:
        validate_settings(self, _SIDECAR)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``UNLOCKD_*`` variables; an override that is not None wins.

        Overrides are keyed by field name (``port=8601``), as the command line passes them.
        Raises :class:`InvalidInputError` naming the variable or flag of a bad value.
        """
        values = read_settings(environ, _SIDECAR, overrides)
        values.setdefault("cache_dir", default_cache_dir(environ))
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


_SIDECAR = {
    "host": Setting("UNLOCKD_HOST", text),
    "port": Setting("UNLOCKD_PORT", port_number),
    "upstream_url": Setting("UNLOCKD_UPSTREAM_URL", http_url, "--upstream"),
    "cdn_url": Setting("UNLOCKD_CDN_URL", http_url, "--cdn"),
    "cache_dir": Setting("UNLOCKD_CACHE_DIR", path),
    "archive": Setting("UNLOCKD_ARCHIVE", path),
    "archive_key_id": Setting("UNLOCKD_ARCHIVE_KEY_ID", name),
    "api_token": Setting("UNLOCKD_API_TOKEN", secret),
    "max_upload": Setting("UNLOCKD_MAX_UPLOAD", at_least(1)),
    # The small part must hold at least the ciphertext header.
    "small_size": Setting("UNLOCKD_SMALL_SIZE", at_least(MIN_SMALL_SIZE)),
    "docker_host": Setting("DOCKER_HOST", text),
    "cache_min_free": Setting("UNLOCKD_CACHE_MIN_FREE", disk_space),
    "cdn_connections": Setting("UNLOCKD_CDN_CONNECTIONS", between(1, 64), "--cdn-connections"),
    # Parts much smaller than this cost a request each; the cache writes them in 1 MiB batches.
    "cdn_part_size": Setting("UNLOCKD_CDN_PART_SIZE", at_least(1 << 20), "--cdn-part-size"),
    "cdn_stall_timeout": Setting("UNLOCKD_CDN_STALL_TIMEOUT", seconds),
    "cache_max_bytes": Setting("UNLOCKD_CACHE_MAX_BYTES", at_least(0), "--cache-max-bytes"),
}


# -- limits of an HTTP server (the sidecar's and the hub's) ---------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may cost a server (SPEC §12); the defaults are the spec's.

    Read with :meth:`from_environ`: ``UNLOCKD_MAX_CONNECTIONS`` for the sidecar,
    ``UNLOCKD_HUB_MAX_CONNECTIONS`` for the hub, and so on (:data:`LIMIT_VARIABLES`).
    """

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    max_connections: int = 1000
    max_json_bytes: int = 64 * 1024
    max_json_depth: int = 32
    send_timeout: float = 60.0
    send_buffer_budget: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        validate_settings(self, limit_settings("UNLOCKD_"))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], prefix: str = "UNLOCKD_") -> Limits:
        """Read the limits from ``{prefix}MAX_HEADER_BYTES`` and the like; unset ones default."""
        return cls(**read_settings(environ, limit_settings(prefix), {}))


# Field -> variable suffix and cast. The floors keep a typo from making a server unusable:
# a request line and a few headers need a KiB, a JSON login body a few hundred bytes.
LIMIT_VARIABLES: dict[str, tuple[str, Cast[Any]]] = {
    "max_header_bytes": ("MAX_HEADER_BYTES", at_least(1024)),
    "header_timeout": ("HEADER_TIMEOUT", seconds),
    "max_connections": ("MAX_CONNECTIONS", at_least(1)),
    "max_json_bytes": ("MAX_JSON_BYTES", at_least(1024)),
    "max_json_depth": ("MAX_JSON_DEPTH", at_least(2)),
    "send_timeout": ("SEND_TIMEOUT", seconds),
    "send_buffer_budget": ("SEND_BUFFER_BUDGET", at_least(1 << 20)),
}


def limit_settings(prefix: str) -> dict[str, Setting]:
    """The settings table of :class:`Limits` with variables named ``{prefix}{suffix}``."""
    return {
        field: Setting(f"{prefix}{suffix}", cast)
        for field, (suffix, cast) in LIMIT_VARIABLES.items()
    }


# -- passwords ----------------------------------------------------------------------------


def read_password(environ: Mapping[str, str] | None = None, prompt: str = "Password: ") -> str:
    """Return the password from ``UNLOCKD_PASSWORD`` or, on a terminal, a prompt; never argv."""
    environ = os.environ if environ is None else environ
    if password := environ.get("UNLOCKD_PASSWORD"):
        return password
    if not sys.stdin.isatty():
        msg = "no password: set UNLOCKD_PASSWORD or run on a terminal"
        raise InvalidInputError(msg)
    password = getpass.getpass(prompt)
    if not password:
        msg = "empty password"
        raise InvalidInputError(msg)
    return password

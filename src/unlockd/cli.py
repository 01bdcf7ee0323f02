"""The ``unlockd`` command line: parses flags and hands each subcommand to its module."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from unlockd import __version__
from unlockd.errors import UnlockdError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


# Each subcommand's module is imported only when it runs: `unlockd --help` and `unlockd
# keygen` stay fast without the web stack. Nothing below cli imports it.


def _serve(args: argparse.Namespace) -> int:
    from unlockd.commands import serve_command  # noqa: PLC0415 - see above

    return serve_command(args)


def _seal(args: argparse.Namespace) -> int:
    from unlockd.commands import seal_command  # noqa: PLC0415

    return seal_command(args)


def _cache(args: argparse.Namespace) -> int:
    from unlockd.cachedir import cache_command  # noqa: PLC0415

    return cache_command(args)


def _dev(args: argparse.Namespace) -> int:
    from unlockd.dev import dev_command  # noqa: PLC0415

    return dev_command(args)


def _hub(args: argparse.Namespace) -> int:
    from unlockd.hub.commands import add_user_command, hub_command  # noqa: PLC0415

    return add_user_command(args) if args.hub_command == "add-user" else hub_command(args)


def _keygen(args: argparse.Namespace) -> int:
    from unlockd.filecrypt import keygen_command  # noqa: PLC0415

    return keygen_command(args)


def _encrypt(args: argparse.Namespace) -> int:
    from unlockd.filecrypt import encrypt_command  # noqa: PLC0415

    return encrypt_command(args)


def _decrypt(args: argparse.Namespace) -> int:
    from unlockd.filecrypt import decrypt_command  # noqa: PLC0415

    return decrypt_command(args)


def _add_hub_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", metavar="ADDR", help="bind address (UNLOCKD_HUB_HOST, default 127.0.0.1)"
    )
    p.add_argument("--port", type=int, help="bind port (UNLOCKD_HUB_PORT, default 8700)")
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="SQLite database and blobs (UNLOCKD_HUB_DATA_DIR, default "
        "$XDG_DATA_HOME/unlockd/hub, i.e. ~/.local/share/unlockd/hub)",
    )
    p.add_argument(
        "--token-ttl",
        type=int,
        metavar="SECONDS",
        help="token lifetime (UNLOCKD_HUB_TOKEN_TTL, default 3600)",
    )
    p.add_argument(
        "--upload-ttl",
        type=int,
        metavar="SECONDS",
        help="how long an unpublished upload is kept (UNLOCKD_HUB_UPLOAD_TTL, default 3600)",
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="postgresql://USER[:PASS]@HOST[:PORT]/DB or sqlite:///ABS/PATH "
        "(UNLOCKD_HUB_DATABASE, default SQLite in the data dir)",
    )
    p.add_argument(
        "--blobs",
        metavar="URL",
        help="s3://BUCKET[/PREFIX] (AWS_* variables) or a directory "
        "(UNLOCKD_HUB_BLOBS, default DATA_DIR/blobs)",
    )
    p.add_argument(
        "--presign-ttl",
        type=int,
        metavar="SECONDS",
        help="validity of presigned S3 URLs (UNLOCKD_HUB_PRESIGN_TTL, default 3600)",
    )


def _add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="list or prune a model cache directory (offline)")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    for name, text in (
        ("list", "list the entries: resource, size, last use, etag"),
        (
            "prune",
            "remove superseded versions, then least recently used entries beyond --max-bytes",
        ),
    ):
        c = cache_sub.add_parser(name, help=text)
        c.add_argument("--cache-dir", required=True, metavar="DIR", help="the cache directory")
        if name == "prune":
            c.add_argument("--max-bytes", type=int, metavar="N", help="keep at most N bytes")
        c.set_defaults(func=_cache)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlockd",
        description="Edge sidecar: streams encrypted models decrypted over local HTTP, "
        "encrypts uploads, and unlocks encrypted Docker image archives.",
    )
    parser.add_argument("--version", action="version", version=f"unlockd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="run the sidecar (default 127.0.0.1:8600)")
    p.add_argument("--host", metavar="ADDR", help="bind address (UNLOCKD_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (UNLOCKD_PORT, default 8600)")
    p.add_argument(
        "--upstream",
        metavar="URL",
        help="upstream API URL (UNLOCKD_UPSTREAM_URL, default http://127.0.0.1:8700)",
    )
    p.add_argument(
        "--cdn",
        metavar="URL",
        help="replaces scheme://host:port of big-part URLs (UNLOCKD_CDN_URL)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="model cache directory (UNLOCKD_CACHE_DIR, default ~/.cache/unlockd/models)",
    )
    p.add_argument(
        "--archive", metavar="PATH", help="encrypted image archive to unlock (UNLOCKD_ARCHIVE)"
    )
    p.add_argument(
        "--archive-key-id",
        metavar="ID",
        help="upstream key id of the archive (UNLOCKD_ARCHIVE_KEY_ID, default images)",
    )
    p.add_argument(
        "--api-token",
        metavar="TOKEN",
        help="require 'Authorization: Bearer TOKEN' locally (UNLOCKD_API_TOKEN)",
    )
    p.add_argument(
        "--cache-min-free",
        metavar="BYTES|PERCENT",
        help="free space to keep on the cache's filesystem, e.g. 5000000000 or 10%% "
        "(UNLOCKD_CACHE_MIN_FREE, default 10%%); /ready is 503 below it",
    )
    p.add_argument(
        "--cdn-connections",
        type=int,
        metavar="N",
        help="concurrent range requests per big part (UNLOCKD_CDN_CONNECTIONS, default 8)",
    )
    p.add_argument(
        "--cdn-part-size",
        type=int,
        metavar="BYTES",
        help="size of each range request (UNLOCKD_CDN_PART_SIZE, default 8388608)",
    )
    p.add_argument(
        "--cache-max-bytes",
        type=int,
        metavar="N",
        help="evict least recently used entries beyond this size (UNLOCKD_CACHE_MAX_BYTES)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("hub", help="run the reference upstream (default 127.0.0.1:8700)")
    _add_hub_serve_flags(p)
    hub_sub = p.add_subparsers(dest="hub_command", metavar="SUBCOMMAND")
    add_user = hub_sub.add_parser(
        "add-user", help="create or update an account (password from UNLOCKD_PASSWORD or prompt)"
    )
    # Its own dest: a sub-parser's default would overwrite `unlockd hub --data-dir X add-user`.
    add_user.add_argument(
        "--data-dir",
        dest="user_data_dir",
        metavar="DIR",
        help="the hub's data directory (default: the hub's --data-dir, UNLOCKD_HUB_DATA_DIR, "
        "or ~/.local/share/unlockd/hub)",
    )
    add_user.add_argument(
        "--database",
        dest="user_database",
        metavar="URL",
        help="the hub's database (default: the hub's --database, UNLOCKD_HUB_DATABASE, "
        "or SQLite in the data directory)",
    )
    add_user.add_argument("--email", required=True)
    add_user.add_argument("--role", choices=["reader", "publisher"], default="reader")
    p.set_defaults(func=_hub)

    p = sub.add_parser(
        "seal",
        help="encrypt a docker-save archive (or local images) and register its key at the hub",
    )
    p.add_argument("input", nargs="?", help="a 'docker save' tar, or - for stdin")
    p.add_argument("output", help="where to write the encrypted archive")
    p.add_argument(
        "--image", action="append", default=[], metavar="NAME:TAG", help="export from the engine"
    )
    p.add_argument(
        "--key-id", metavar="ID", required=True, help="register the archive key under this id"
    )
    p.add_argument("--upstream", metavar="URL", required=True, help="the upstream (hub) URL")
    p.add_argument(
        "--email", required=True, help="a publisher account (password: UNLOCKD_PASSWORD)"
    )
    p.set_defaults(func=_seal)

    p = sub.add_parser("keygen", help="write a new random key (base64) to OUTPUT or stdout")
    p.add_argument("output", nargs="?", help="key file to create (mode 0600); stdout by default")
    p.set_defaults(func=_keygen)

    for name, func, verb in (("encrypt", _encrypt, "encrypt"), ("decrypt", _decrypt, "decrypt")):
        p = sub.add_parser(name, help=f"{verb} a stream in Tink's AES-GCM-HKDF streaming format")
        p.add_argument("--key-file", required=True, help="base64 of a 32-byte key")
        p.add_argument("--aad", default="", help="associated data (UTF-8 text)")
        p.add_argument("input", nargs="?", default="-", help="input file, - for stdin (default)")
        p.add_argument("output", nargs="?", default="-", help="output file, - for stdout (default)")
        p.set_defaults(func=func)

    _add_cache_parser(sub)

    p = sub.add_parser(
        "dev", help="hub + sidecar on loopback with a demo account, data in ./.unlockd-dev"
    )
    p.add_argument("--port", type=int, help="the sidecar's port (default 8600)")
    p.add_argument("--hub-port", type=int, help="the hub's port (default 8700)")
    p.add_argument(
        "--demo-image",
        metavar="NAME:TAG",
        help="tag of the sealed demo image (default unlockd-demo:latest)",
    )
    p.set_defaults(func=_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UnlockdError as exc:
        print(f"unlockd {args.command}: {exc.message}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130

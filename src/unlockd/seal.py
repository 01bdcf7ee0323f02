"""``unlockd seal``: encrypt a ``docker save`` archive and register its key at the hub."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx

from unlockd.api_client import ApiClient
from unlockd.config import http_url
from unlockd.crypto_stream import encrypt_stream, generate_key
from unlockd.docker import DockerLoader
from unlockd.errors import ForbiddenError, InvalidInputError, UnlockdError
from unlockd.models import validate_name
from unlockd.progress import Progress

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterable, AsyncIterator, Callable

__all__ = ["SealSource", "seal", "seal_command"]

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class SealSource:
    """Where the plaintext archive comes from: a file, stdin (``-``), or engine images."""

    path: str | None = None
    images: tuple[str, ...] = ()
    docker_host: str | None = None

    @classmethod
    def parse(cls, path: str | None, images: list[str]) -> SealSource:
        """Validate the command line's choice of input; raise InvalidInputError."""
        if path is not None and images:
            msg = "give either INPUT or --image, not both"
            raise InvalidInputError(msg)
        if path is None and not images:
            msg = "no input: give a 'docker save' tar file, - for stdin, or --image NAME:TAG"
            raise InvalidInputError(msg)
        if path is not None and path != "-" and not Path(path).is_file():
            msg = f"input {path!r} is not a file"
            raise InvalidInputError(msg)
        return cls(path=path, images=tuple(images))

    async def size(self) -> int | None:
        """The plaintext size if known in advance (files only)."""
        if self.path is None or self.path == "-":
            return None
        return (await anyio.Path(self.path).stat()).st_size

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the plaintext archive."""
        if self.images:
            loader = DockerLoader(self.docker_host)
            try:
                async for chunk in loader.export(list(self.images)):
                    yield chunk
            finally:
                await loader.close()
            return
        if self.path == "-":
            stdin = anyio.wrap_file(sys.stdin.buffer)
            while chunk := await stdin.read(CHUNK_SIZE):
                yield chunk
            return
        assert self.path is not None
        async with await anyio.open_file(self.path, "rb") as file:
            while chunk := await file.read(CHUNK_SIZE):
                yield chunk


async def seal(  # noqa: PLR0913 - the command's inputs, keyword-only
    source: SealSource | AsyncIterable[bytes],
    output: Path,
    *,
    key_id: str,
    upstream: str,
    email: str,
    password: str,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Encrypt ``source`` into ``output`` and register the key; return the ciphertext size.

    ``source`` is a :class:`SealSource` or any async iterable of plaintext bytes. The archive
    goes to a temp file beside ``output`` first; the key is registered only once the archive
    is complete (so a failure never replaces a working key), and ``output`` appears only
    after both succeeded.
    """
    validate_name(key_id, "key id")
    key = generate_key()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as http:
        hub = ApiClient(http, upstream)
        # Fail fast on bad credentials, an unreachable hub or a reader account, before the
        # long part. A hub that does not name the role is told by the key upload below.
        await hub.login(email, password)
        if hub.role not in {None, "publisher"}:
            raise _not_publisher(email, upstream)
        tmp = output.with_name(f".{output.name}.{os.urandom(6).hex()}.tmp")
        try:
            written = await _write(tmp, encrypt_stream(_counted(source, on_progress), key))
            try:
                await hub.put_key(key_id, key)
            except ForbiddenError as exc:
                raise _not_publisher(email, upstream) from exc
            try:
                await anyio.Path(tmp).rename(output)
            except OSError as exc:
                msg = f"cannot write {output}: {exc.strerror or exc}"
                raise UnlockdError(msg) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.Path(tmp).unlink(missing_ok=True)
            raise
    return written


def _not_publisher(email: str, upstream: str) -> ForbiddenError:
    return ForbiddenError(f"{email} is not a publisher at {upstream}")


async def _counted(
    source: SealSource | AsyncIterable[bytes], on_progress: Callable[[int], None] | None
) -> AsyncIterator[bytes]:
    chunks = source.chunks() if isinstance(source, SealSource) else source
    async for chunk in chunks:
        if on_progress is not None:
            on_progress(len(chunk))
        yield chunk


async def _write(path: Path, chunks: AsyncIterator[bytes]) -> int:
    written = 0
    try:
        async with await anyio.open_file(path, "xb") as file:
            async for chunk in chunks:
                await file.write(chunk)
                written += len(chunk)
            await file.flush()
            await anyio.to_thread.run_sync(os.fsync, file.wrapped.fileno())
    except OSError as exc:
        msg = f"cannot write {path.parent}: {exc.strerror or exc}"
        raise UnlockdError(msg) from exc
    return written


def seal_command(args: argparse.Namespace) -> int:
    """Run ``unlockd seal`` from parsed arguments; return the exit status."""
    from unlockd.cli import read_password  # noqa: PLC0415 - cli imports this module lazily

    source = SealSource.parse(args.input, list(args.image))
    validate_name(args.key_id, "key id")
    upstream = http_url("--upstream", args.upstream)
    output = Path(args.output)
    # Checked before anything else: a failure after the key is registered would leave the
    # hub with a key that no archive on disk matches.
    if output.is_dir():
        msg = f"output {args.output!r} is a directory"
        raise InvalidInputError(msg)
    if not output.parent.is_dir():
        msg = f"output directory {str(output.parent)!r} does not exist"
        raise InvalidInputError(msg)
    if not os.access(output.parent, os.W_OK):
        msg = f"output directory {str(output.parent)!r} is not writable"
        raise InvalidInputError(msg)
    password = read_password(prompt=f"Password for {args.email}: ")

    async def run() -> int:
        with Progress(await source.size(), "seal") as progress:
            return await seal(
                source,
                output,
                key_id=args.key_id,
                upstream=upstream,
                email=args.email,
                password=password,
                on_progress=progress.advance,
            )

    size = anyio.run(run)
    print(  # noqa: T201
        f"sealed {output} ({size} bytes); key {args.key_id!r} registered at {upstream}"
    )
    return 0

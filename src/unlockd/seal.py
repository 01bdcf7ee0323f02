"""Sealing: encrypt a ``docker save`` archive and register its key at the hub (``unlockd seal``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx

from unlockd.api_client import ApiClient
from unlockd.crypto_stream import encrypt_stream, generate_key
from unlockd.docker import DockerLoader
from unlockd.errors import ForbiddenError, InvalidInputError, StorageError
from unlockd.files import AtomicFile
from unlockd.models import validate_name

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Callable

__all__ = ["SealSource", "seal"]

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
        try:
            async with AtomicFile(output, mode=0o666) as temp:
                written = await _write(temp, encrypt_stream(_counted(source, on_progress), key))
                try:
                    await hub.put_key(key_id, key)
                except ForbiddenError as exc:
                    raise _not_publisher(email, upstream) from exc
        except OSError as exc:
            msg = f"cannot write {output}: {exc.strerror or exc}"
            raise StorageError(msg) from exc
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


async def _write(temp: AtomicFile, chunks: AsyncIterator[bytes]) -> int:
    written = 0
    async for chunk in chunks:
        await anyio.to_thread.run_sync(temp.file.write, chunk)
        written += len(chunk)
    return written

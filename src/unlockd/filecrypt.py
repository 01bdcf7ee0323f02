"""``unlockd keygen``, ``unlockd encrypt`` and ``unlockd decrypt``: files and pipes, streamed.

Input is read in 1 MiB pieces into one reused buffer and never held whole. An output file is
written under a temporary name in its directory and renamed into place only once the stream
has been authenticated to its end (as age does), so a failed decryption leaves no file behind;
on stdout the output just stops before the first segment that failed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from unlockd.crypto_stream import Decryptor, Encryptor, decode_key, encode_key, generate_key
from unlockd.errors import (
    ConflictError,
    InvalidInputError,
    InvalidKeyError,
    StorageError,
)
from unlockd.files import AtomicFile
from unlockd.progress import Progress

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

__all__ = ["decrypt_command", "encrypt_command", "keygen_command"]

_READ_SIZE = 1 << 20
_STDIO = "-"


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by ``unlockd keygen``."""
    try:
        with Path(path).open("rb") as f:
            text = f.read(4096)
    except OSError as exc:
        msg = f"cannot read key file {os.fspath(path)!r}: {exc.strerror}"
        raise InvalidKeyError(msg) from exc
    return decode_key(text)


def keygen_command(args: argparse.Namespace) -> int:
    """Write a fresh key (base64 and a newline) to a new file of mode 0600, or to stdout."""
    text = encode_key(generate_key()) + "\n"
    if args.output in (None, _STDIO):
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0
    try:
        # O_EXCL: never overwrite a key, which would lose whatever it encrypted.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        msg = f"{args.output} already exists; not overwriting a key file"
        raise ConflictError(msg) from None
    except OSError as exc:
        msg = f"cannot create {args.output}: {exc.strerror}"
        raise InvalidInputError(msg) from exc
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    return 0


def encrypt_command(args: argparse.Namespace) -> int:
    """Encrypt INPUT to OUTPUT (stdin/stdout for ``-``) in Tink's streaming format."""
    # fsencode: the UTF-8 bytes of --aad, and the raw bytes of an argument that is not UTF-8
    # (which Python surrogate-escapes) rather than a traceback.
    encryptor = Encryptor(read_key_file(args.key_file), os.fsencode(args.aad))
    _transform(args.input, args.output, "encrypt", encryptor.feed, encryptor.finalize)
    return 0


def decrypt_command(args: argparse.Namespace) -> int:
    """Decrypt INPUT to OUTPUT; release only authenticated segments; fail on any damage."""
    decryptor = Decryptor(read_key_file(args.key_file), os.fsencode(args.aad))
    _transform(args.input, args.output, "decrypt", decryptor.feed, decryptor.finalize)
    return 0


def _transform(
    source: str,
    destination: str,
    label: str,
    feed: Callable[[memoryview], list[bytes]],
    finalize: Callable[[], bytes],
) -> None:
    with _open_input(source) as (reader, size), _open_output(destination) as out:
        buffer = bytearray(_READ_SIZE)
        view = memoryview(buffer)
        with Progress(size, label) as progress:
            while n := _read_into(reader, view, source):
                # feed() copies or consumes the piece before returning, so the buffer is reused.
                with _writing(destination):
                    out.writelines(feed(view[:n]))
                progress.advance(n)
            last = finalize()
            with _writing(destination):
                out.write(last)


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[tuple[IO[bytes], int | None]]:
    """Yield a binary reader and the input size when it is a regular file."""
    if path == _STDIO:
        yield sys.stdin.buffer, _regular_size(sys.stdin.buffer)
        return
    try:
        # Unbuffered: readinto() then fills our buffer straight from the file.
        reader = Path(path).open("rb", buffering=0)  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise InvalidInputError(msg) from exc
    with reader:
        yield reader, _regular_size(reader)


def _regular_size(f: IO[bytes]) -> int | None:
    try:
        info = os.fstat(f.fileno())
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


@contextlib.contextmanager
def _open_output(path: str) -> Iterator[IO[bytes]]:
    """Yield a binary writer; a file appears at ``path`` only if the block succeeds."""
    if path == _STDIO:
        yield sys.stdout.buffer
        with _writing(path):
            sys.stdout.buffer.flush()
        return
    # Through a symlink to its target, not over the link itself.
    target = Path(path).resolve()
    if target.is_dir() or path.endswith(os.sep):
        # Checked up front: the rename would fail only after the whole stream was processed.
        msg = f"cannot write {path}: it is a directory"
        raise InvalidInputError(msg)
    if target.exists() and not target.is_file():
        # A device or a FIFO (/dev/null, a pipe): write into it, as a shell redirection does.
        try:
            special = target.open("wb")
        except OSError as exc:
            msg = f"cannot write {path}: {exc.strerror}"
            raise InvalidInputError(msg) from exc
        with special:
            yield special
            with _writing(path):
                special.flush()
        return
    # 0666 as open() would, less the umask: the result is an ordinary file of the user's.
    temp = AtomicFile(target, mode=0o666)
    try:
        temp.open()
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror}"
        raise InvalidInputError(msg) from exc
    try:
        yield temp.file
        with _writing(path):
            temp.publish()
    finally:
        temp.discard()


def _read_into(reader: IO[bytes], view: memoryview, path: str) -> int:
    try:
        # typing.IO lacks readinto(); files opened "rb" and sys.stdin.buffer have it.
        n = reader.readinto(view)  # type: ignore[attr-defined]
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise InvalidInputError(msg) from exc
    return int(n or 0)


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Translate a failed write or flush of ``path`` into one clear error."""
    try:
        yield
    except BrokenPipeError:
        _close_stdout()
        msg = "output closed before the end"
        raise StorageError(msg) from None
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror}"
        raise StorageError(msg) from exc


def _close_stdout() -> None:
    # Point stdout at /dev/null so the interpreter's own flush at exit does not fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

"""`unlockd keygen/encrypt/decrypt` run as the real CLI, on files and on pipes."""

from __future__ import annotations

import base64
import os
import pty
import stat
import subprocess
import sys

import pytest

from unlockd.crypto_stream import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    Encryptor,
    encode_key,
    generate_key,
)
from unlockd.filecrypt import read_key_file

PS = SEGMENT_SIZE - TAG_SIZE


def unlockd(*args, stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "unlockd", *map(str, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[bytes], command: str) -> str:
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith(f"unlockd {command}: ")
    assert message.endswith("\n")
    assert message.count("\n") == 1, message
    return message


def write_key(path):
    path.write_text(encode_key(generate_key()) + "\n")
    return path


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "key")


@pytest.fixture(scope="module")
def plaintext():
    return os.urandom(3 * SEGMENT_SIZE + 12345)


def test_filecrypt_keygen_creates_private_base64_file(tmp_path):
    """keygen writes base64 of 32 bytes and a newline to a new file of mode 0600."""
    path = tmp_path / "k"
    result = unlockd("keygen", path)
    assert result.returncode == 0
    assert result.stdout == result.stderr == b""
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.endswith("\n")
    assert len(base64.b64decode(text.strip(), validate=True)) == 32


def test_filecrypt_keygen_refuses_to_overwrite(key_file):
    """An existing key file is never replaced."""
    before = key_file.read_bytes()
    message = one_line_error(unlockd("keygen", key_file), "keygen")
    assert "already exists" in message
    assert key_file.read_bytes() == before


def test_filecrypt_keygen_without_output_prints_key():
    """keygen with no OUTPUT prints one key line on stdout."""
    result = unlockd("keygen")
    assert result.returncode == 0
    assert len(base64.b64decode(result.stdout.strip(), validate=True)) == 32
    assert result.stdout.count(b"\n") == 1


def test_filecrypt_files_round_trip_and_tink_agrees(tmp_path, key_file, plaintext, tink_stream):
    """encrypt/decrypt files with --aad; Tink decrypts our file and we decrypt Tink's."""
    source, sealed, opened = tmp_path / "model.bin", tmp_path / "model.enc", tmp_path / "out.bin"
    source.write_bytes(plaintext)
    assert (
        unlockd("encrypt", "--key-file", key_file, "--aad", "model.bin", source, sealed).returncode
        == 0
    )
    assert (
        unlockd("decrypt", "--key-file", key_file, "--aad", "model.bin", sealed, opened).returncode
        == 0
    )
    assert opened.read_bytes() == plaintext
    key = base64.b64decode(key_file.read_text())
    tink = tink_stream(key, SEGMENT_SIZE)
    assert tink.decrypt(sealed.read_bytes(), b"model.bin") == plaintext
    (tmp_path / "tink.enc").write_bytes(tink.encrypt(plaintext, b"model.bin"))
    result = unlockd("decrypt", "--key-file", key_file, "--aad", "model.bin", tmp_path / "tink.enc")
    assert result.returncode == 0
    assert result.stdout == plaintext
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "key",
        "model.bin",
        "model.enc",
        "out.bin",
        "tink.enc",
    ]


def test_filecrypt_pipes_round_trip(key_file, plaintext, tink_stream):
    """Without INPUT/OUTPUT (or with -) both commands stream stdin to stdout."""
    sealed = unlockd("encrypt", "--key-file", key_file, stdin=plaintext)
    assert sealed.returncode == 0
    assert sealed.stderr == b""  # no progress bar when stderr is not a terminal
    key = base64.b64decode(key_file.read_text())
    assert tink_stream(key, SEGMENT_SIZE).decrypt(sealed.stdout, b"") == plaintext
    opened = unlockd("decrypt", "--key-file", key_file, "-", "-", stdin=sealed.stdout)
    assert opened.returncode == 0
    assert opened.stdout == plaintext


@pytest.fixture
def sealed_file(tmp_path, key_file, plaintext):
    encryptor = Encryptor(read_key_file(key_file), b"a")
    sealed = tmp_path / "sealed"
    sealed.write_bytes(encryptor.update(plaintext) + encryptor.finalize())
    return sealed


def _damage(kind: str, ciphertext: bytes) -> bytes:
    if kind == "truncated-at-boundary":
        return ciphertext[: 2 * SEGMENT_SIZE]
    if kind == "truncated-inside":
        return ciphertext[:-1]
    if kind == "trailing":
        return ciphertext + b"\0"
    if kind == "corrupted":
        damaged = bytearray(ciphertext)
        damaged[SEGMENT_SIZE + 100] ^= 1
        return bytes(damaged)
    return ciphertext


FAILURES = {
    # kind: (damage, extra args, words expected in the message)
    "missing-key-file": ("none", ["--key-file", "nokey"], "cannot read key file"),
    "malformed-key-file": ("none", ["--key-file", "badkey"], "base64"),
    "wrong-key": ("none", ["--key-file", "otherkey"], "failed authentication"),
    "wrong-aad": ("none", ["--aad", "b"], "failed authentication"),
    "truncated-at-boundary": ("truncated-at-boundary", [], "truncated"),
    "truncated-inside": ("truncated-inside", [], "failed authentication"),
    "trailing": ("trailing", [], "failed authentication"),  # the partial last segment changed
    "corrupted": ("corrupted", [], "failed authentication"),
    "missing-input": ("none", ["--input", "absent"], "cannot read"),
}


@pytest.mark.parametrize("kind", FAILURES)
def test_filecrypt_decrypt_failure_exits_1_and_leaves_no_output(
    tmp_path, key_file, sealed_file, kind
):
    """Each failure is exit 1 with one line, and OUTPUT (an old one included) stays as it was."""
    damage, extra, words = FAILURES[kind]
    sealed_file.write_bytes(_damage(damage, sealed_file.read_bytes()))
    (tmp_path / "badkey").write_text("not a key\n")
    write_key(tmp_path / "otherkey")
    args = {"--key-file": key_file, "--aad": "a", "--input": sealed_file}
    args.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    output = tmp_path / "out"
    output.write_bytes(b"old content")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = unlockd(
        "decrypt",
        "--key-file",
        args["--key-file"],
        "--aad",
        args["--aad"],
        args["--input"],
        output,
        cwd=tmp_path,
    )
    assert words in one_line_error(result, "decrypt")
    assert output.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left


def test_filecrypt_decrypt_trailing_after_full_last_segment_named(tmp_path, key_file):
    """Bytes after a full last segment are reported as trailing data."""
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(2 * PS - HEADER_SIZE))
    sealed = unlockd("encrypt", "--key-file", key_file, plain).stdout
    result = unlockd("decrypt", "--key-file", key_file, stdin=sealed + b"x")
    assert "data follows the last segment" in one_line_error(result, "decrypt")


def test_filecrypt_decrypt_to_stdout_stops_before_failing_segment(key_file, sealed_file, plaintext):
    """On stdout, decryption writes the authentic segments and nothing of the damaged one."""
    damaged = bytearray(sealed_file.read_bytes())
    damaged[2 * SEGMENT_SIZE + 5] ^= 0x80
    result = unlockd("decrypt", "--key-file", key_file, "--aad", "a", stdin=bytes(damaged))
    one_line_error(result, "decrypt")
    assert result.stdout == plaintext[: 2 * PS - HEADER_SIZE]


def test_filecrypt_encrypt_missing_output_dir_fails_cleanly(tmp_path, key_file):
    """An OUTPUT in a missing directory is exit 1 with one line."""
    result = unlockd("encrypt", "--key-file", key_file, "-", tmp_path / "no" / "out", stdin=b"x")
    assert "cannot write" in one_line_error(result, "encrypt")


def test_filecrypt_progress_drawn_on_terminal_only(tmp_path, key_file):
    """With stderr on a terminal, encrypt draws a bar with the percentage; the result is intact."""
    source = tmp_path / "plain"
    source.write_bytes(os.urandom(2 * SEGMENT_SIZE))
    controller, terminal = pty.openpty()
    try:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "unlockd",
                "encrypt",
                "--key-file",
                key_file,
                source,
                tmp_path / "out",
            ],
            stderr=terminal,
            stdout=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not data:
                break
            drawn += data
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert b"encrypt" in drawn
    assert b"100%" in drawn
    assert (tmp_path / "out").stat().st_size == 2 * SEGMENT_SIZE + HEADER_SIZE + 3 * TAG_SIZE


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_filecrypt_output_directory_fails_before_reading(tmp_path, key_file, command):
    """An OUTPUT that is a directory is one line, before any work; no temp file anywhere."""
    target = tmp_path / "out"
    target.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = unlockd(command, "--key-file", key_file, "-", target, stdin=b"x" * 1000)
    assert "is a directory" in one_line_error(result, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(target.iterdir()) == []


def test_filecrypt_output_fifo_written_into_not_replaced(tmp_path, key_file, plaintext):
    """An OUTPUT that is a FIFO (or a device) is written into, as a shell redirection would."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    result = unlockd("encrypt", "--key-file", key_file, "-", fifo, stdin=plaintext[:5000])
    ciphertext, _ = reader.communicate(timeout=30)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    decrypted = unlockd("decrypt", "--key-file", key_file, stdin=ciphertext)
    assert decrypted.stdout == plaintext[:5000]


def test_filecrypt_output_symlink_writes_its_target(tmp_path, key_file, plaintext):
    """An OUTPUT that is a symlink keeps the link and replaces the file it points to."""
    target = tmp_path / "real.enc"
    target.write_bytes(b"old")
    link = tmp_path / "link.enc"
    link.symlink_to(target)
    result = unlockd("encrypt", "--key-file", key_file, "-", link, stdin=plaintext[:5000])
    assert result.returncode == 0, result.stderr
    assert link.is_symlink()
    decrypted = unlockd("decrypt", "--key-file", key_file, target)
    assert decrypted.stdout == plaintext[:5000]


def test_filecrypt_output_trailing_slash_fails_before_reading(tmp_path, key_file):
    """An OUTPUT ending in / names a directory: one line, and nothing is written."""
    result = unlockd("encrypt", "--key-file", key_file, "-", f"{tmp_path}/out.enc/", stdin=b"x")
    assert "is a directory" in one_line_error(result, "encrypt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]

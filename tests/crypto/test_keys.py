"""Key files: base64 of 32 bytes, optional trailing newline; anything else is refused."""

from __future__ import annotations

import base64

import pytest

from unlockd.crypto_stream import decode_key, encode_key, generate_key
from unlockd.errors import InvalidKeyError
from unlockd.filecrypt import read_key_file


def test_keys_generate_encode_decode_round_trip():
    """A generated key survives its file form, with or without a newline."""
    key = generate_key()
    assert len(key) == 32
    assert decode_key(encode_key(key)) == key
    assert decode_key(encode_key(key) + "\n") == key
    assert decode_key((encode_key(key) + "\r\n").encode()) == key


@pytest.mark.parametrize(
    "text",
    ["", "not base64!", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode()],
)
def test_keys_malformed_text_rejected(text):
    """Bad base64 and wrong lengths are InvalidKeyError."""
    with pytest.raises(InvalidKeyError):
        decode_key(text)


def test_keys_encode_wrong_length_rejected():
    """Only 32-byte keys are written."""
    with pytest.raises(InvalidKeyError):
        encode_key(bytes(16))


def test_keys_read_key_file_reads_and_reports_missing(tmp_path):
    """read_key_file parses a file, and a missing one is an InvalidKeyError naming it."""
    key = generate_key()
    path = tmp_path / "k"
    path.write_text(encode_key(key) + "\n")
    assert read_key_file(path) == key
    with pytest.raises(InvalidKeyError, match="missing"):
        read_key_file(tmp_path / "missing")

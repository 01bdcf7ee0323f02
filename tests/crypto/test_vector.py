"""The regression vector of SPEC.md section 2, checked against us and against Tink."""

from __future__ import annotations

from unlockd.crypto_stream import Decryptor, Encryptor

KEY = bytes(range(32))
HEADER = bytes([0x28]) + b"\xaa" * 32 + b"\xbb" * 7
EXPECTED = HEADER + bytes.fromhex("f93f2e265a4c68b851fe2cc6c40d8620e4132d5ad21985dc008998")


def test_vector_encryptor_with_fixed_header_matches_spec():
    """Our encryption of the spec's inputs is exactly the spec's 67 bytes."""
    encryptor = Encryptor(KEY, b"aad", segment_size=4096, header=HEADER)
    ciphertext = encryptor.update(b"hello world") + encryptor.finalize()
    assert len(ciphertext) == 67
    assert ciphertext == EXPECTED


def test_vector_decryptor_opens_spec_ciphertext():
    """The spec's ciphertext decrypts to b"hello world"."""
    decryptor = Decryptor(KEY, b"aad", segment_size=4096)
    assert decryptor.update(EXPECTED) + decryptor.finalize() == b"hello world"


def test_vector_tink_opens_spec_ciphertext(tink_stream):
    """Tink agrees with the spec's vector."""
    assert tink_stream(KEY, 4096).decrypt(EXPECTED, b"aad") == b"hello world"

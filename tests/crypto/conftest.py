"""Fixtures for the crypto tests: real Tink primitives built from our raw keys."""

from __future__ import annotations

import io

import pytest
import tink
from tink import secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

streaming_aead.register()

_TYPE_URL = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"


class TinkStream:
    """Tink's StreamingAead for one raw key and segment size, with bytes in and out."""

    def __init__(self, key: bytes, segment_size: int) -> None:
        params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
            ciphertext_segment_size=segment_size,
            derived_key_size=32,
            hkdf_hash_type=common_pb2.SHA256,
        )
        key_proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
            version=0, key_value=key, params=params
        )
        key_data = tink_pb2.KeyData(
            type_url=_TYPE_URL,
            value=key_proto.SerializeToString(),
            key_material_type=tink_pb2.KeyData.SYMMETRIC,
        )
        keyset = tink_pb2.Keyset(
            primary_key_id=1,
            key=[
                tink_pb2.Keyset.Key(
                    key_data=key_data,
                    status=tink_pb2.ENABLED,
                    key_id=1,
                    output_prefix_type=tink_pb2.RAW,
                )
            ],
        )
        handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
        self.primitive = handle.primitive(streaming_aead.StreamingAead)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        sink = _KeepOnClose()
        with self.primitive.new_encrypting_stream(sink, associated_data) as stream:
            stream.write(plaintext)
        return sink.value

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        with self.primitive.new_decrypting_stream(io.BytesIO(ciphertext), associated_data) as s:
            return s.read()


class _KeepOnClose(io.BytesIO):
    """Tink closes the sink it writes to; keep what was written."""

    value = b""

    def close(self) -> None:
        self.value = self.getvalue()
        super().close()


@pytest.fixture(scope="session")
def tink_stream():
    """Factory: ``tink_stream(key, segment_size)`` -> a :class:`TinkStream`."""
    return TinkStream

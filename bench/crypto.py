"""Throughput of the streaming AEAD's async adapters vs raw AES-GCM (``python -m bench crypto``).

A plaintext of ``BENCH_GIB`` GiB (default 1) goes through :func:`encrypt_stream` and a
ciphertext of the same plaintext size through :func:`decrypt_stream`, both fed as 64 KiB chunks
from memory. The reference is ``AESGCM.encrypt``/``AESGCM.decrypt`` over the same number of
1 MiB segments in the same run; the figure that matters is the ratio (target >= 0.9).
A third row feeds the ciphertext as one ``bytes`` per segment, as 1 MiB reads from a file
give it (both sides then pay for making those ``bytes``): the adapter copies nothing there.

Nothing of the size of the stream is stored. The decrypt input is made on the fly from one
reused segment buffer: GCM's tag is GHASH(ciphertext) XOR AES_K(J0), and GHASH depends only on
the ciphertext, so one full-size segment body stays authentic at every index once its tag is
recomputed for that index's nonce (one AES block each, precomputed before timing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import time
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from unlockd.crypto_stream import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    Decryptor,
    Encryptor,
    SegmentCipher,
    SegmentLayout,
    decrypt_stream,
    encrypt_stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator

CHUNK = 64 * 1024
GIB = 1 << 30


class _Workload:
    """A plaintext size, its segments, and a way to produce an authentic ciphertext stream."""

    def __init__(self, size: int) -> None:
        self.layout = SegmentLayout(SEGMENT_SIZE)
        ps = self.layout.plaintext_segment_size
        size = max(size, 2 * ps)
        self.size = size
        self.count = self.layout.segment_count_for_plaintext(size)
        self.key = os.urandom(32)
        self.header = SegmentCipher.new_header()
        salt, self.prefix = self.header[1:33], self.header[33:]
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"").derive(self.key)
        self.aead = AESGCM(derived)
        ecb = Cipher(algorithms.AES(derived), modes.ECB()).encryptor()  # noqa: S305 - one block: E_K(J0)

        self.plain_chunk = os.urandom(CHUNK)
        self.plain_segment = memoryview(os.urandom(ps))
        self.last_plain = size - (ps - HEADER_SIZE) - (self.count - 2) * ps
        # Segment 0 and the last one are sealed for real; the middle ones reuse one body.
        first = self.aead.encrypt(
            self.nonce(0, last=False), self.plain_segment[: ps - HEADER_SIZE], None
        )
        self.first = self.header + first  # exactly one segment size long
        self.last = self.aead.encrypt(
            self.nonce(self.count - 1, last=True), self.plain_segment[: self.last_plain], None
        )
        middle = self.aead.encrypt(self.nonce(1, last=False), self.plain_segment, None)
        self.middle = bytearray(middle)
        ghash = _xor(middle[-TAG_SIZE:], ecb.update(self.nonce(1, last=False) + b"\0\0\0\1"))
        self.tags = [
            _xor(ghash, ecb.update(self.nonce(i, last=False) + b"\0\0\0\1"))
            for i in range(self.count - 1)
        ]

    def nonce(self, index: int, last: bool) -> bytes:
        return self.prefix + struct.pack(">IB", index, last)

    async def plaintext(self) -> AsyncIterator[bytes]:
        chunk, remaining = self.plain_chunk, self.size
        while remaining >= CHUNK:
            yield chunk
            remaining -= CHUNK
        if remaining:
            yield chunk[:remaining]

    def ciphertext_chunks(self) -> Iterator[memoryview]:
        """The ciphertext as 64 KiB views; the middle segments all come from one buffer."""
        yield from _chunks(self.first)
        middle = memoryview(self.middle)
        for index in range(1, self.count - 1):
            self.middle[-TAG_SIZE:] = self.tags[index]
            yield from _chunks(middle)
        yield from _chunks(self.last)

    async def ciphertext(self) -> AsyncIterator[memoryview]:
        for chunk in self.ciphertext_chunks():
            yield chunk

    def segments(self) -> Iterator[bytes]:
        """The ciphertext as one fresh ``bytes`` per segment, as reads of 1 MiB from a file."""
        yield bytes(self.first)
        for index in range(1, self.count - 1):
            self.middle[-TAG_SIZE:] = self.tags[index]
            yield bytes(self.middle)
        yield self.last

    async def aligned(self) -> AsyncIterator[bytes]:
        for segment in self.segments():
            yield segment

    def raw_decrypt_aligned(self) -> int:
        total = 0
        for index, segment in enumerate(self.segments()):
            body = memoryview(segment)[HEADER_SIZE:] if index == 0 else segment
            last = index == self.count - 1
            total += len(self.aead.decrypt(self.nonce(index, last=last), body, None))
        return total

    async def adapter_decrypt_aligned(self) -> int:
        total = 0
        async for chunk in decrypt_stream(self.aligned(), self.key):
            total += len(chunk)
        return total

    def raw_decrypt_aligned_into(self) -> int:
        total, out = 0, memoryview(bytearray(self.layout.plaintext_segment_size))
        for index, segment in enumerate(self.segments()):
            body = memoryview(segment)[HEADER_SIZE:] if index == 0 else memoryview(segment)
            last = index == self.count - 1
            n = len(body) - TAG_SIZE
            self.aead.decrypt_into(self.nonce(index, last=last), body, None, out[:n])
            total += n
        return total

    def raw_encrypt(self) -> int:
        ps, total = self.layout.plaintext_segment_size, HEADER_SIZE
        total += len(
            self.aead.encrypt(
                self.nonce(0, last=False), self.plain_segment[: ps - HEADER_SIZE], None
            )
        )
        for index in range(1, self.count - 1):
            total += len(self.aead.encrypt(self.nonce(index, last=False), self.plain_segment, None))
        last = self.plain_segment[: self.last_plain]
        return total + len(self.aead.encrypt(self.nonce(self.count - 1, last=True), last, None))

    def raw_encrypt_into(self) -> int:
        ps, total = self.layout.plaintext_segment_size, HEADER_SIZE
        out = memoryview(bytearray(self.layout.segment_size))
        plain = self.plain_segment
        for index in range(self.count):
            n = ps - HEADER_SIZE if index == 0 else ps
            if index == self.count - 1:
                n = self.last_plain
            nonce = self.nonce(index, last=index == self.count - 1)
            self.aead.encrypt_into(nonce, plain[:n], None, out[: n + TAG_SIZE])
            total += n + TAG_SIZE
        return total

    def raw_decrypt(self) -> int:
        total = len(
            self.aead.decrypt(self.nonce(0, last=False), memoryview(self.first)[HEADER_SIZE:], None)
        )
        for index in range(1, self.count - 1):
            self.middle[-TAG_SIZE:] = self.tags[index]
            total += len(self.aead.decrypt(self.nonce(index, last=False), self.middle, None))
        return total + len(
            self.aead.decrypt(self.nonce(self.count - 1, last=True), self.last, None)
        )

    def raw_decrypt_into(self) -> int:
        out = memoryview(bytearray(self.layout.plaintext_segment_size))
        first = memoryview(self.first)[HEADER_SIZE:]
        n = len(first) - TAG_SIZE
        self.aead.decrypt_into(self.nonce(0, last=False), first, None, out[:n])
        total = n
        for index in range(1, self.count - 1):
            self.middle[-TAG_SIZE:] = self.tags[index]
            self.aead.decrypt_into(self.nonce(index, last=False), self.middle, None, out)
            total += len(out)
        n = len(self.last) - TAG_SIZE
        self.aead.decrypt_into(self.nonce(self.count - 1, last=True), self.last, None, out[:n])
        return total + n

    async def gather(self) -> int:
        """Only copy the ciphertext chunks into a segment buffer: the adapters' floor."""
        buffer = memoryview(bytearray(SEGMENT_SIZE))
        filled = total = 0
        async for chunk in self.ciphertext():
            n = len(chunk)
            if filled + n > SEGMENT_SIZE:
                filled = 0
            buffer[filled : filled + n] = chunk
            filled += n
            total += n
        return total

    async def adapter_encrypt(self) -> int:
        total = 0
        async for chunk in encrypt_stream(self.plaintext(), self.key):
            total += len(chunk)
        return total

    def feed_encrypt(self) -> int:
        encryptor = Encryptor(self.key)
        total, feed, chunk = 0, encryptor.feed, self.plain_chunk
        remaining = self.size
        while remaining >= CHUNK:
            for piece in feed(chunk):
                total += len(piece)
            remaining -= CHUNK
        for piece in feed(chunk[:remaining]):
            total += len(piece)
        return total + len(encryptor.finalize())

    def feed_decrypt(self) -> int:
        decryptor = Decryptor(self.key)
        total, feed = 0, decryptor.feed
        for chunk in self.ciphertext_chunks():
            for piece in feed(chunk):
                total += len(piece)
        return total + len(decryptor.finalize())

    async def adapter_decrypt(self) -> int:
        total = 0
        async for chunk in decrypt_stream(self.ciphertext(), self.key):
            total += len(chunk)
        return total


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _chunks(data: bytes | bytearray | memoryview) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]


def _pairs(repeat: int, runs: dict[str, Callable[[], int]], expect: int) -> dict[str, list[float]]:
    """CPU seconds of each run, ``repeat`` times, alternated (A, B, C, A, B, C, ...).

    Alternation makes noise hit every side alike; CPU time rather than wall time because the
    machine is shared (parallel test runs, other benchmarks), and a preempted run would
    otherwise count another process's work. Everything here is single-threaded.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.process_time()
            produced = run()
            times[name].append(time.process_time() - start)
            if produced != expect:
                msg = f"{name} produced {produced} bytes, expected {expect}"
                raise AssertionError(msg)
    return times


def _row(name: str, times: dict[str, list[float]], mib: float) -> str:
    """One table line: MiB per CPU second (medians), and medians of the per-pair ratios."""
    adapter, fresh, into = times["adapter"], times["raw"], times["raw_into"]
    # The reference is the stronger raw loop: fresh bytes per segment, or one reused buffer.
    strongest = into if statistics.median(into) < statistics.median(fresh) else fresh
    ratio = statistics.median(r / a for a, r in zip(adapter, strongest, strict=True))
    ratio_fresh = statistics.median(r / a for a, r in zip(adapter, fresh, strict=True))
    return (
        f"{name:<30} {mib / statistics.median(adapter):>8.0f} "
        f"{mib / statistics.median(fresh):>10.0f} {mib / statistics.median(into):>10.0f} "
        f"{ratio:>7.2f} {ratio_fresh:>8.2f}"
    )


def main(argv: list[str]) -> int:
    """Measure and print the table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench crypto")
    parser.add_argument(
        "--repeat", type=int, default=5, help="alternated runs of each side (default 5)"
    )
    args = parser.parse_args(argv)
    work = _Workload(int(float(os.environ.get("BENCH_GIB", "1")) * GIB))
    ciphertext_size = work.layout.ciphertext_size(work.size)
    loop = asyncio.new_event_loop()

    def run(coroutine: Callable[[], Coroutine[None, None, int]]) -> Callable[[], int]:
        return lambda: loop.run_until_complete(coroutine())

    cases = [
        (
            "encrypt_stream, 64 KiB chunks",
            ciphertext_size,
            {
                "adapter": run(work.adapter_encrypt),
                "raw": work.raw_encrypt,
                "raw_into": work.raw_encrypt_into,
            },
        ),
        (
            "Encryptor.feed, 64 KiB chunks",
            ciphertext_size,
            {
                "adapter": work.feed_encrypt,
                "raw": work.raw_encrypt,
                "raw_into": work.raw_encrypt_into,
            },
        ),
        (
            "decrypt_stream, 64 KiB chunks",
            work.size,
            {
                "adapter": run(work.adapter_decrypt),
                "raw": work.raw_decrypt,
                "raw_into": work.raw_decrypt_into,
            },
        ),
        (
            "Decryptor.feed, 64 KiB chunks",
            work.size,
            {
                "adapter": work.feed_decrypt,
                "raw": work.raw_decrypt,
                "raw_into": work.raw_decrypt_into,
            },
        ),
        (
            "decrypt_stream, 1 MiB bytes",
            work.size,
            {
                "adapter": run(work.adapter_decrypt_aligned),
                "raw": work.raw_decrypt_aligned,
                "raw_into": work.raw_decrypt_aligned_into,
            },
        ),
    ]
    try:
        rows = [(name, _pairs(args.repeat, runs, expect)) for name, expect, runs in cases]
        gather = _pairs(args.repeat, {"gather": run(work.gather)}, ciphertext_size)["gather"]
    finally:
        loop.close()
    mib = work.size / (1 << 20)
    print(
        f"{work.size / GIB:.2f} GiB plaintext, {work.count} segments of 1 MiB; MiB per CPU "
        f"second (medians of {args.repeat}); ratio = median over alternated runs of raw time / "
        "adapter time, against the stronger raw loop (fresh bytes or into one reused buffer)"
    )
    print(
        f"{'op':<30} {'adapter':>8} {'raw fresh':>10} {'raw into':>10} {'ratio':>7} {'vs fresh':>8}"
    )
    for name, times in rows:
        print(_row(name, times, mib))
    gib = work.size / GIB
    print(
        f"per GiB: gathering 64 KiB chunks into segments (memcpy) alone takes "
        f"{statistics.median(gather) / gib * 1000:.0f} ms"
    )
    return 0

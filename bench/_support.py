"""What the benchmarks share: ports, our CLI as a subprocess, and the memory of a process."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from collections.abc import Iterator

GIB = 1 << 30


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unlockd(*args: str) -> list[str]:
    """The command line that runs ``unlockd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "unlockd", *args]


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str], url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends, once ``url`` answers; its stderr goes to ``log``."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                msg = f"{args[:4]} exited: {log.read_text()[-2000:]}"
                raise RuntimeError(msg)
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=1).status_code < 500:
                    break
            if time.monotonic() > deadline:
                msg = f"{args[:4]} did not start: {log.read_text()[-2000:]}"
                raise RuntimeError(msg)
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmHWM", "VmRSS"}:
            fields[key] = int(value.split()[0]) * 1024
    return fields

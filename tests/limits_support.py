"""Raw-socket clients for the limit tests of both servers (SPEC §12, issue 11's repros)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from urllib.parse import urlsplit


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def connect(url: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A blocking socket to ``url``'s server; ``rcvbuf`` small makes a client that stalls."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(address(url))
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, stopping without an error where the server closed the connection."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status_and_detail(raw: bytes) -> tuple[int, str]:
    """The status code and the JSON ``detail`` of a raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)["detail"]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Tell whether the server closes ``sock`` (sending nothing more) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return read_all(sock) == b""
    except TimeoutError:
        return False


def request(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A request head, ``Connection: close``."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def elapsed(start: float) -> float:
    return time.monotonic() - start

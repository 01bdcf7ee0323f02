"""Raw-socket clients for the limit tests of both servers (SPEC §12, issue 11's repros)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import uvicorn

from harness import PUBLISHER, eventually

if TYPE_CHECKING:
    from collections.abc import Iterator


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


def server_connections(url: str) -> int:
    """Connections that ``url``'s server (in this process) holds a descriptor for."""
    port = f"{address(url)[1]:04X}"
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        # 0A is LISTEN; inode 0 is a socket no descriptor refers to (closed, or not accepted).
        if local.endswith(f":{port}") and state != "0A" and inode != "0":
            held += 1
    return held


def publish_blob(url: str, name: str, data: bytes) -> str:
    """Publish ``data`` at the hub ``url`` as the big part of models/``name``; its etag."""
    with httpx.Client(base_url=url, timeout=60) as client:
        token = client.post("/auth/login", json=PUBLISHER.body).json()["token"]
        client.headers["authorization"] = f"Bearer {token}"
        upload_id = client.post("/uploads").json()["upload_id"]
        assert client.put(f"/uploads/{upload_id}", content=data).status_code == 200
        key = base64.b64encode(bytes(32)).decode()
        body = {"upload_id": upload_id, "key": key, "small": "c21hbGw="}
        reply = client.put(f"/resources/models/{name}", json=body)
        assert reply.status_code == 201, reply.text
        return str(reply.json()["etag"])


def bound_socket() -> tuple[socket.socket, str]:
    """A socket bound to an ephemeral loopback port, for :func:`serve_together`; its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def serve_together(configs: list[uvicorn.Config], sockets: list[socket.socket]) -> Iterator[None]:
    """Run a server per config and socket on one event loop in a thread, as ``unlockd dev``."""
    servers = [uvicorn.Server(config) for config in configs]

    async def run() -> None:
        await asyncio.gather(*(s.serve([sock]) for s, sock in zip(servers, sockets, strict=True)))

    def main() -> None:
        with asyncio.Runner(loop_factory=configs[0].get_loop_factory()) as runner:
            runner.run(run())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    eventually(lambda: all(s.started for s in servers) or not thread.is_alive())
    try:
        yield
    finally:
        for server in servers:
            server.should_exit = True
        thread.join(timeout=15)
        for sock in sockets:
            sock.close()

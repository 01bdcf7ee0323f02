"""`python -m bench unlock`: unlock of a sealed image archive vs `docker load -i` of its plaintext.

Builds a ``docker save`` archive of ``BENCH_GIB`` GiB (default 1) of random data in a few layers
and seals it with ``unlockd seal`` against a real hub. Then, on the same engine, it runs
``--pairs`` pairs (default ``BENCH_PAIRS`` or 5) alternately, A, B, A, B, …: ``POST /unlock`` of
the sealed archive through a real ``unlockd serve`` (polling ``/unlock/status`` until ``ready``)
and ``docker load -i`` of the plaintext tar. Each run starts after ``sync`` (so the writeback
of the last one is not counted) and ends by removing the image, whose tag is unique to this run:
no other image is touched. The figure is the median of the per-pair ratios unlock / docker load
(goal <= 1.1x, SPEC §7), with the sidecar's peak RSS (VmHWM). Uses the engine at
``DOCKER_HOST``, or starts a private one with ``.ci/dockerd`` (and stops it) when none answers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench._support import (
    GIB,
    MIB,
    Pairs,
    Report,
    Row,
    alternate,
    bench_pairs,
    check_free_space,
    command,
    free_port,
    machine,
    memory,
    process,
    rate,
    spread,
    unlockd,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
PUBLISHER = ("bench-publisher@example.com", "bench-publisher-password")
READER = ("bench-reader@example.com", "bench-reader-password")


class _Random:
    """A file-like source of ``size`` random bytes, for tarfile.addfile."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def build_archive(path: Path, tag: str, size: int, layers: int) -> None:
    """Write a `docker save` archive of one image with ``layers`` random layers to ``path``."""
    work = path.parent
    entries = []
    for i in range(layers):
        layer = work / f"layer{i}.tar"
        with tarfile.open(layer, "w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo(f"data/blob{i}.bin")
            info.size = size // layers
            info.mtime = int(time.time())
            tar.addfile(info, _Random(info.size))
        with layer.open("rb") as f:
            entries.append((layer, hashlib.file_digest(f, "sha256").hexdigest()))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for _, d in entries]},
            "history": [{"created_by": "unlockd bench"} for _ in entries],
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps(
        [
            {
                "Config": config_name,
                "RepoTags": [tag],
                "Layers": [f"{d}/layer.tar" for _, d in entries],
            }
        ]
    ).encode()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for layer, digest in entries:
            tar.add(layer, arcname=f"{digest}/layer.tar")
            layer.unlink()
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _Bytes(data))


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out


def _engine_ok(host: str) -> bool:
    result = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        env={**os.environ, "DOCKER_HOST": host},
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@contextlib.contextmanager
def _engine() -> Iterator[str]:
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if _engine_ok(host):
        yield host
        return
    out = subprocess.run(
        [str(ROOT / ".ci" / "dockerd"), "start"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(item.split("=", 1) for item in out.removeprefix("export ").split())
    print(f"started a private dockerd at {env['DOCKER_HOST']}")
    try:
        yield env["DOCKER_HOST"]
    finally:
        subprocess.run(
            [str(ROOT / ".ci" / "dockerd"), "stop", env["UNLOCKD_CI_DOCKER_DIR"]], check=False
        )


def _remove(tag: str, env: dict[str, str]) -> None:
    subprocess.run(["docker", "image", "rm", "-f", tag], env=env, capture_output=True, check=False)


def _time_docker_load(plain: Path, tag: str, env: dict[str, str]) -> float:
    os.sync()  # start each run with no writeback of the last one pending
    t0 = time.perf_counter()
    subprocess.run(["docker", "load", "-i", str(plain)], env=env, capture_output=True, check=True)
    elapsed = time.perf_counter() - t0
    _remove(tag, env)
    return elapsed


def _time_unlock(sidecar: str, tag: str, env: dict[str, str]) -> float:
    os.sync()
    with httpx.Client(base_url=sidecar, timeout=30) as client:
        t0 = time.perf_counter()
        response = client.post("/unlock", json={"email": READER[0], "password": READER[1]})
        response.raise_for_status()
        while (status := client.get("/unlock/status").json())["state"] not in {"ready", "error"}:
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
    if status["state"] != "ready" or status["images"] != [tag]:
        msg = f"unlock failed: {status}"
        raise RuntimeError(msg)
    _remove(tag, env)
    return elapsed


def _needed_space(size: int) -> int:
    # The layers and the archive while it is built, then the archive, the sealed copy and the
    # engine's copy of the loaded image (vfs stores it whole); plus some room.
    return 4 * size + GIB


def main(argv: list[str]) -> int:
    """Run the benchmark and print a table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench unlock")
    parser.add_argument(
        "--pairs", type=int, default=bench_pairs(), help="alternated pairs (default 5)"
    )
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1 (and 3 for a ratio that counts)")
    gib = float(os.environ.get("BENCH_GIB", "1"))
    size = int(gib * GIB)
    check_free_space(Path(tempfile.gettempdir()), _needed_space(size), f"a {gib:g} GiB archive")
    tag = f"unlockd-bench/{uuid.uuid4().hex[:12]}:v1"
    report = Report(
        f"`python -m bench unlock`: {gib:g} GiB archive, medians of {args.pairs} alternated pairs",
        command("unlock", argv, gib),
    )
    with tempfile.TemporaryDirectory(prefix="unlockd-bench-") as tmp, _engine() as docker_host:
        work = Path(tmp)
        env = {**os.environ, "DOCKER_HOST": docker_host}
        plain, sealed = work / "plain.tar", work / "images.enc"
        t0 = time.perf_counter()
        build_archive(plain, tag, size, args.layers)
        archive_size = plain.stat().st_size
        print(
            f"archive: {archive_size / GIB:.2f} GiB in {args.layers} layers, "
            f"built in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        hub_dir = work / "hub"
        for (email, password), role in ((PUBLISHER, "publisher"), (READER, "reader")):
            subprocess.run(
                unlockd(
                    "hub", "add-user", "--data-dir", str(hub_dir), "--email", email, "--role", role
                ),
                env={**env, "UNLOCKD_PASSWORD": password},
                check=True,
            )
        hub_port, sidecar_port = free_port(), free_port()
        hub_url, sidecar_url = f"http://127.0.0.1:{hub_port}", f"http://127.0.0.1:{sidecar_port}"
        hub_args = unlockd("hub", "--data-dir", str(hub_dir), "--port", str(hub_port))
        with process(hub_args, env, f"{hub_url}/health", work / "hub.log"):
            t0 = time.perf_counter()
            seal_args = unlockd(
                "seal", str(plain), str(sealed), "--key-id", "images",
                "--upstream", hub_url, "--email", PUBLISHER[0],
            )  # fmt: skip
            subprocess.run(
                seal_args,
                env={**env, "UNLOCKD_PASSWORD": PUBLISHER[1]},
                check=True,
                stdout=subprocess.DEVNULL,
            )
            seal_s = time.perf_counter() - t0
            serve_args = unlockd(
                "serve", "--port", str(sidecar_port), "--upstream", hub_url,
                "--archive", str(sealed), "--cache-dir", str(work / "cache"),
            )  # fmt: skip
            with process(serve_args, env, f"{sidecar_url}/health", work / "sidecar.log") as sidecar:
                idle = memory(sidecar.pid)["VmRSS"]
                _remove(tag, env)

                def progress(index: int, unlock: float, load: float) -> None:
                    print(
                        f"  pair {index}/{args.pairs}: unlock {unlock:.2f} s, "
                        f"docker load -i {load:.2f} s -> {unlock / load:.2f}x",
                        flush=True,
                    )

                pairs = Pairs(
                    archive_size,
                    alternate(
                        lambda: _time_unlock(sidecar_url, tag, env),
                        lambda: _time_docker_load(plain, tag, env),
                        args.pairs,
                        progress,
                    ),
                )
                peak = memory(sidecar.pid)["VmHWM"]
    unlock_s, load_s = (statistics.median(side) for side in zip(*pairs.seconds, strict=True))
    report.rows += [
        Row(
            "`/unlock` vs `docker load -i` of the plaintext tar",
            f"{unlock_s:.2f} s ({rate(archive_size, unlock_s)})",
            f"docker load {load_s:.2f} s ({rate(archive_size, load_s)})",
            spread(pairs.slowdowns()),
            "<= 1.1x",
            statistics.median(pairs.slowdowns()) <= 1.1,
        ),
        Row("sidecar peak RSS (VmHWM), whole run", f"{peak / MIB:.0f} MiB", "", "", "", None),
    ]
    report.notes += [
        f"{machine()}; engine at {docker_host}; images removed after every run",
        "ratios are unlockd seconds / docker load seconds per pair (lower is better)",
        f"sidecar RSS idle {idle / MIB:.0f} MiB; seal took {seal_s:.1f} s (CLI incl. startup)",
    ]
    if args.pairs < 3:
        report.notes.append(f"only {args.pairs} pair(s): SPEC §7 needs at least 3")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

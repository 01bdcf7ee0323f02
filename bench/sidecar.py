"""`python -m bench sidecar`: /load, /upload and /health of a real sidecar vs plain servers.

Runs a hub (``unlockd hub``), a sidecar (``unlockd serve``) and, as references, nginx (when
installed; sendfile, the fastest plain server there is) and a plain Starlette ``FileResponse``
of the same plaintext, each as its own process on loopback; clients are curl (C, so the client
is not the bottleneck). For a file of ``BENCH_GIB`` GiB (default 1) it measures, best of
``--repeat`` runs each:

- warm ``/load`` (big part cached) and cold ``/load`` (cache emptied first), as ratios to the
  plain servers' download of the plaintext (targets >= 0.8 and >= 0.5 of nginx);
- ``/upload`` as a ratio to a plain streaming ``PUT /uploads/{id}`` of the same bytes into the
  hub (target >= 0.5);
- ``/health`` p99 while 8 warm downloads run (target < 25 ms);
- the sidecar's peak RSS (VmHWM) over the whole run (target < 128 MiB, flat in the size).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench._support import GIB, free_port, memory, process, unlockd

if TYPE_CHECKING:
    from collections.abc import Callable

PUBLISHER = ("bench-publisher@example.com", "bench-publisher-password")
_PLAIN_SERVER = textwrap.dedent(
    """
    import sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import FileResponse
    from starlette.routing import Route

    async def plain(request):
        return FileResponse(sys.argv[1], media_type="application/octet-stream")

    app = Starlette(routes=[Route("/plain", plain)])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    """
)


_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-body;
    server {{
        listen 127.0.0.1:{port};
        root {work};
    }}
}}
"""


def _write_plaintext(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with path.open("wb") as file:
        left = size
        while left:
            n = min(left, len(block))
            file.write(block[:n])
            left -= n


def _curl(*args: str) -> float:
    """Run curl; return seconds taken (curl's own total time)."""
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    return float(result.stdout)


def _best(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def _health_p99(sidecar: str, downloads: int, samples: int) -> float:
    stop = threading.Event()

    def download() -> None:
        while not stop.is_set():
            subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-X", "POST", f"{sidecar}/load/bench.bin"],
                check=False,
                timeout=3600,
            )

    threads = [threading.Thread(target=download, daemon=True) for _ in range(downloads)]
    for thread in threads:
        thread.start()
    timings = []
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=sidecar, timeout=10) as client:
            for _ in range(samples):
                started = time.perf_counter()
                client.get("/health").raise_for_status()
                timings.append(time.perf_counter() - started)
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return statistics.quantiles(timings, n=100)[98]


def _hub_put_plain(hub: str, plain: Path) -> float:
    """Time a plain streaming PUT of the plaintext into the hub, then abandon that upload."""
    with httpx.Client(base_url=hub, timeout=60) as client:
        email, password = PUBLISHER
        token = client.post("/auth/login", json={"email": email, "password": password}).json()
        auth = {"Authorization": f"Bearer {token['token']}"}
        upload_id = client.post("/uploads", headers=auth).json()["upload_id"]
        try:
            return _curl(
                "-T", str(plain), "-H", f"Authorization: Bearer {token['token']}",
                f"{hub}/uploads/{upload_id}",
            )  # fmt: skip
        finally:
            client.delete(f"/uploads/{upload_id}", headers=auth)


def main(argv: list[str]) -> int:
    """Run the benchmark and print a table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench sidecar")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    parser.add_argument("--samples", type=int, default=300, help="/health probes under load")
    args = parser.parse_args(argv)
    gib = float(os.environ.get("BENCH_GIB", "1"))
    size = int(gib * GIB)
    work = Path(tempfile.mkdtemp(prefix="unlockd-bench-sidecar-"))
    sidecar_log = work / "sidecar.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLOCKD_")}
    try:
        plain = work / "bench.bin"
        _write_plaintext(plain, size)
        hub_port, sidecar_port, plain_port = free_port(), free_port(), free_port()
        hub, sidecar = f"http://127.0.0.1:{hub_port}", f"http://127.0.0.1:{sidecar_port}"
        cache = work / "cache"
        subprocess.run(
            unlockd("hub", "add-user", "--data-dir", str(work / "hub"), "--email", PUBLISHER[0],
                     "--role", "publisher"),
            env={**env, "UNLOCKD_PASSWORD": PUBLISHER[1]}, check=True,
        )  # fmt: skip
        hub_args = unlockd("hub", "--data-dir", str(work / "hub"), "--port", str(hub_port))
        sidecar_args = unlockd(
            "serve", "--port", str(sidecar_port), "--upstream", hub, "--cache-dir", str(cache)
        )
        plain_args = [sys.executable, "-c", _PLAIN_SERVER, str(plain), str(plain_port)]
        nginx_port = free_port()
        nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        nginx_url = f"http://127.0.0.1:{nginx_port}/bench.bin"
        with contextlib.ExitStack() as stack:
            stack.enter_context(process(hub_args, env, f"{hub}/health", work / "hub.log"))
            sidecar_proc = stack.enter_context(
                process(sidecar_args, env, f"{sidecar}/health", sidecar_log)
            )
            stack.enter_context(
                process(plain_args, env, f"http://127.0.0.1:{plain_port}/", work / "plain.log")
            )
            if nginx is not None:
                conf = work / "nginx.conf"
                conf.write_text(_NGINX_CONF.format(work=work, port=nginx_port))
                stack.enter_context(
                    process([nginx, "-c", str(conf)], env, nginx_url, work / "nginx.log")
                )
            email, password = PUBLISHER
            httpx.post(
                f"{sidecar}/login", json={"email": email, "password": password}, timeout=60
            ).raise_for_status()

            peaks = {"start": memory(sidecar_proc.pid)["VmHWM"]}
            reference_put = _best(args.repeat, lambda: _hub_put_plain(hub, plain))
            upload = _best(
                args.repeat,
                lambda: _curl("-F", f"data=@{plain}", f"{sidecar}/upload/bench.bin"),
            )
            peaks["upload"] = memory(sidecar_proc.pid)["VmHWM"]
            reference_get = _best(
                args.repeat, lambda: _curl(f"http://127.0.0.1:{plain_port}/plain")
            )
            nginx_get = _best(args.repeat, lambda: _curl(nginx_url)) if nginx else None

            def cold() -> float:
                # The fill may still be finishing after the client got its last byte.
                while any(entry.name.startswith(".") for entry in cache.iterdir()):
                    time.sleep(0.05)
                for entry in cache.iterdir():
                    entry.unlink()
                return _curl("-X", "POST", f"{sidecar}/load/bench.bin")

            cold_load = _best(args.repeat, cold)
            peaks["cold"] = memory(sidecar_proc.pid)["VmHWM"]
            _curl("-X", "POST", f"{sidecar}/load/bench.bin")  # make sure it is cached
            warm_load = _best(args.repeat, lambda: _curl("-X", "POST", f"{sidecar}/load/bench.bin"))
            peaks["warm"] = memory(sidecar_proc.pid)["VmHWM"]
            p99 = _health_p99(sidecar, downloads=8, samples=args.samples)
            peak = peaks["8 downloads"] = memory(sidecar_proc.pid)["VmHWM"]

        def rate(seconds: float) -> str:
            return f"{size / seconds / GIB:6.2f} GiB/s"

        def ratios(seconds: float, target: str) -> str:
            text = f"{reference_get / seconds:.2f}x FileResponse"
            if nginx_get is not None:
                text = f"{nginx_get / seconds:.2f}x nginx ({target}), " + text
            return text

        rows = [
            ("plain nginx GET", rate(nginx_get) if nginx_get else "not installed", "reference"),
            ("plain FileResponse GET", rate(reference_get), "reference"),
            ("warm /load", rate(warm_load), ratios(warm_load, ">= 0.8")),
            ("cold /load", rate(cold_load), ratios(cold_load, ">= 0.5")),
            ("plain PUT /uploads (hub)", rate(reference_put), "reference"),
            ("/upload", rate(upload), f"{reference_put / upload:.2f}x (>= 0.5)"),
            ("/health p99, 8 downloads", f"{p99 * 1000:6.1f} ms", "(< 25 ms)"),
            ("sidecar peak RSS (VmHWM)", f"{peak / (1 << 20):6.1f} MiB", "(< 128 MiB)"),
        ]
        print(f"file size {gib:g} GiB, best of {args.repeat}, 2 processes + curl on loopback")
        for name, value, note in rows:
            print(f"  {name:<26} {value:>14}   {note}")
        steps = ", ".join(f"{k} {v / (1 << 20):.0f}" for k, v in peaks.items())
        print(f"  peak RSS after each step (MiB): {steps}")
    except subprocess.CalledProcessError:
        print(f"sidecar log:\n{sidecar_log.read_text()[:12000]}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0

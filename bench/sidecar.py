"""`python -m bench sidecar`: /load, /upload and /health of a real sidecar vs plain servers.

A hub (``unlockd hub``), a sidecar (``unlockd serve``) and nginx run as processes on loopback,
for a file of ``BENCH_GIB`` GiB (default 1) of random bytes; every client is curl (C, so the
client is not the bottleneck) writing to /dev/null. Each ratio comes from ``--pairs`` pairs
(default ``BENCH_PAIRS`` or 5) run alternately in this one run, A, B, A, B, …, and is the
median of the per-pair ratios (SPEC §7):

- warm ``/load`` (big part cached) vs nginx serving the same plaintext (goal >= 1.0x, floor
  0.8x). nginx is the strongest plain server we know, in its strongest configuration: one
  instance serves the file from two locations, ``sendfile on`` and ``sendfile off``, with the
  same tuning; each pair downloads from both, in alternating order, and keeps the faster;
- cold ``/load`` (cache emptied before each run, after the previous background fill has
  finished, so the big part comes from the hub) vs that nginx (goal >= 0.5x);
- ``/upload`` (``curl -F`` multipart into the sidecar, which encrypts and publishes) vs a plain
  streaming ``PUT /uploads/{id}`` of the same bytes into the hub (goal >= 0.8x);
- ``/health`` p99 while 8 warm downloads run (goal < 25 ms);
- the sidecar's peak RSS (VmHWM) over the whole run (goal <= 96 MiB).

Write-heavy runs (uploads, cold loads) start after ``sync``, so the writeback of one run does
not land in the next; that time is not counted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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
    from collections.abc import Callable

PUBLISHER = ("bench-publisher@example.com", "bench-publisher-password")
FILENAME = "bench.bin"
HEALTH_DOWNLOADS = 8
FILL_TIMEOUT = 600.0

# One worker, like the sidecar's one process; the two locations differ only in sendfile.
# output_buffers applies to sendfile off, tcp_nopush to sendfile on: each mode at its best.
_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    tcp_nopush on;
    output_buffers 2 1m;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        location /sendfile-on/ {{ alias {work}/; sendfile on; }}
        location /sendfile-off/ {{ alias {work}/; sendfile off; }}
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


def _curl(*args: str, size: int | None = None) -> float:
    """Run curl; return the seconds it took (curl's own total), checking the size received.

    ``Expect:`` is sent empty so that no upload waits for a ``100 Continue``.
    """
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-H", "Expect:", "-o", "/dev/null",
         "-w", "%{time_total} %{size_download}", *args],
        capture_output=True, text=True, check=True, timeout=3600,
    )  # fmt: skip
    seconds, received = result.stdout.split()
    if size is not None and int(received) != size:
        msg = f"curl {args[-1]}: received {received} bytes, expected {size}"
        raise RuntimeError(msg)
    return float(seconds)


@dataclasses.dataclass(frozen=True)
class _Fastest:
    seconds: float
    mode: str
    other: float  # seconds of the slower mode


@dataclasses.dataclass
class _Nginx:
    """nginx serving the plaintext with ``sendfile`` on and off; each call keeps the faster."""

    base: str
    size: int
    calls: int = 0

    def fastest(self) -> _Fastest:
        """Download from both locations (in alternating order) and keep the faster."""
        modes = ["sendfile off", "sendfile on"]
        if self.calls % 2:
            modes.reverse()
        self.calls += 1
        seconds = {
            mode: _curl(f"{self.base}/{mode.replace(' ', '-')}/{FILENAME}", size=self.size)
            for mode in modes
        }
        best, slower = sorted(seconds, key=seconds.__getitem__)
        return _Fastest(seconds[best], best, seconds[slower])


@dataclasses.dataclass
class _Sidecar:
    """The sidecar under test, the hub behind it, and what each measured run does."""

    url: str
    hub: str
    cache: Path
    plain: Path
    size: int

    def load(self) -> float:
        """Time one ``POST /load`` of the whole file."""
        return _curl("-X", "POST", f"{self.url}/load/{FILENAME}", size=self.size)

    def cold_load(self) -> float:
        """Time one ``/load`` with the cache emptied first; return once the fill is done too."""
        self.empty_cache()
        os.sync()
        seconds = self.load()
        # The fill may still be finishing after the client got its last byte; wait for it
        # (not timed) so that it does not run into the next measurement.
        self.wait_for_fill()
        return seconds

    def wait_for_fill(self) -> None:
        """Wait until no download into the cache is in progress (no temp file left)."""
        deadline = time.monotonic() + FILL_TIMEOUT
        while any(entry.name.startswith(".") for entry in self.cache.rglob("*")):
            if time.monotonic() > deadline:
                msg = f"the cache fill in {self.cache} did not finish in {FILL_TIMEOUT:.0f} s"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def empty_cache(self) -> None:
        """Remove every cached entry, once no fill is running."""
        self.wait_for_fill()
        for entry in self.cache.rglob("*"):
            if entry.is_file():
                entry.unlink()

    def upload(self) -> float:
        """Time one multipart ``/upload`` of the plaintext."""
        os.sync()
        return _curl("-F", f"data=@{self.plain}", f"{self.url}/upload/{FILENAME}")

    def hub_put_plain(self) -> float:
        """Time a plain streaming PUT of the plaintext into the hub, then abandon that upload."""
        with httpx.Client(base_url=self.hub, timeout=60) as client:
            email, password = PUBLISHER
            login = client.post("/auth/login", json={"email": email, "password": password})
            token = login.raise_for_status().json()["token"]
            auth = {"Authorization": f"Bearer {token}"}
            created = client.post("/uploads", headers=auth).raise_for_status().json()
            path = f"/uploads/{created['upload_id']}"
            try:
                os.sync()
                return _curl(
                    "-T", str(self.plain), "-H", f"Authorization: Bearer {token}",
                    f"{self.hub}{path}",
                )  # fmt: skip
            finally:
                client.delete(path, headers=auth)

    def health_under_load(self, samples: int) -> list[float]:
        """Seconds each of ``samples`` ``/health`` probes took while 8 warm downloads ran."""
        stop = threading.Event()

        def download() -> None:
            while not stop.is_set():
                subprocess.run(
                    ["curl", "-sS", "-o", "/dev/null", "-X", "POST", f"{self.url}/load/{FILENAME}"],
                    check=False,
                    timeout=3600,
                )

        threads = [threading.Thread(target=download, daemon=True) for _ in range(HEALTH_DOWNLOADS)]
        for thread in threads:
            thread.start()
        timings = []
        try:
            time.sleep(0.5)
            with httpx.Client(base_url=self.url, timeout=10) as client:
                for _ in range(samples):
                    started = time.perf_counter()
                    client.get("/health").raise_for_status()
                    timings.append(time.perf_counter() - started)
                    time.sleep(0.01)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=600)
        return timings


def _against_nginx(
    name: str, ours: Callable[[], float], nginx: _Nginx, pairs: int, size: int
) -> tuple[Pairs, collections.Counter[str]]:
    def progress(index: int, seconds: float, best: _Fastest) -> None:
        print(
            f"  {name} pair {index}/{pairs}: unlockd {rate(size, seconds)}, "
            f"nginx {rate(size, best.seconds)} ({best.mode}; the other "
            f"{rate(size, best.other)}) -> {best.seconds / seconds:.2f}x",
            flush=True,
        )

    results = alternate(ours, nginx.fastest, pairs, progress)
    wins = collections.Counter(best.mode for _, best in results)
    return Pairs(size, [(seconds, best.seconds) for seconds, best in results]), wins


def _download_row(measure: str, pairs: Pairs, goal: float, floor: float) -> Row:
    ours, reference = pairs.rates()
    ratio = statistics.median(pairs.speedups())
    met: bool | str = ratio >= goal or ("floor" if ratio >= floor else False)
    goal_text = f">= {goal:.1f}x" + (f" (floor {floor:.1f}x)" if floor < goal else "")
    return Row(
        measure,
        f"{ours:.2f} GiB/s",
        f"nginx {reference:.2f} GiB/s",
        spread(pairs.speedups()),
        goal_text,
        met,
    )


def _wins(wins: collections.Counter[str]) -> str:
    return ", ".join(f"{mode} in {n}/{wins.total()}" for mode, n in wins.most_common())


def _needed_space(size: int) -> int:
    # The plaintext, the hub's blob plus the next version's while it is published, the cache
    # entry and a plain PUT being received; plus some room.
    return 5 * size + GIB


def main(argv: list[str]) -> int:
    """Run the benchmark and print a table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench sidecar")
    parser.add_argument(
        "--pairs", type=int, default=bench_pairs(), help="alternated pairs per ratio (default 5)"
    )
    parser.add_argument("--samples", type=int, default=300, help="/health probes under load")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1 (and 3 for a ratio that counts)")
    gib = float(os.environ.get("BENCH_GIB", "1"))
    size = int(gib * GIB)
    nginx_bin = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx_bin is None:
        msg = "nginx is the reference of this benchmark and is not installed (apt install nginx)"
        raise SystemExit(msg)
    check_free_space(Path(tempfile.gettempdir()), _needed_space(size), f"{gib:g} GiB files")
    work = Path(tempfile.mkdtemp(prefix="unlockd-bench-sidecar-"))
    sidecar_log = work / "sidecar.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLOCKD_")}
    report = Report(
        f"`python -m bench sidecar`: {gib:g} GiB file, medians of {args.pairs} alternated pairs",
        command("sidecar", argv, gib),
    )
    try:
        plain = work / FILENAME
        _write_plaintext(plain, size)
        hub_port, sidecar_port, nginx_port = free_port(), free_port(), free_port()
        hub, url = f"http://127.0.0.1:{hub_port}", f"http://127.0.0.1:{sidecar_port}"
        sidecar = _Sidecar(url, hub, work / "cache", plain, size)
        nginx = _Nginx(f"http://127.0.0.1:{nginx_port}", size)
        subprocess.run(
            unlockd("hub", "add-user", "--data-dir", str(work / "hub"), "--email", PUBLISHER[0],
                    "--role", "publisher"),
            env={**env, "UNLOCKD_PASSWORD": PUBLISHER[1]}, check=True,
        )  # fmt: skip
        hub_args = unlockd("hub", "--data-dir", str(work / "hub"), "--port", str(hub_port))
        sidecar_args = unlockd(
            "serve", "--port", str(sidecar_port), "--upstream", hub,
            "--cache-dir", str(sidecar.cache),
        )  # fmt: skip
        conf = work / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(work=work, port=nginx_port))
        with contextlib.ExitStack() as stack:
            stack.enter_context(process(hub_args, env, f"{hub}/health", work / "hub.log"))
            proc = stack.enter_context(process(sidecar_args, env, f"{url}/health", sidecar_log))
            stack.enter_context(
                process(
                    [nginx_bin, "-c", str(conf)],
                    env,
                    f"{nginx.base}/sendfile-on/{FILENAME}",
                    work / "nginx.log",
                )
            )
            email, password = PUBLISHER
            httpx.post(
                f"{url}/login", json={"email": email, "password": password}, timeout=60
            ).raise_for_status()
            peaks = {"start": memory(proc.pid)["VmHWM"]}

            def upload_progress(index: int, ours: float, reference: float) -> None:
                print(
                    f"  /upload pair {index}/{args.pairs}: unlockd {rate(size, ours)}, "
                    f"plain PUT {rate(size, reference)} -> {reference / ours:.2f}x",
                    flush=True,
                )

            uploads = Pairs(
                size, alternate(sidecar.upload, sidecar.hub_put_plain, args.pairs, upload_progress)
            )
            peaks["upload"] = memory(proc.pid)["VmHWM"]

            sidecar.load()  # fills the cache
            sidecar.wait_for_fill()
            warm, warm_wins = _against_nginx("warm /load", sidecar.load, nginx, args.pairs, size)
            peaks["warm /load"] = memory(proc.pid)["VmHWM"]
            cold, cold_wins = _against_nginx(
                "cold /load", sidecar.cold_load, nginx, args.pairs, size
            )
            peaks["cold /load"] = memory(proc.pid)["VmHWM"]
            sidecar.load()  # the health probes run against warm downloads
            sidecar.wait_for_fill()
            health = sidecar.health_under_load(args.samples)
            peak = peaks["8 downloads"] = memory(proc.pid)["VmHWM"]

        upload_rates = uploads.rates()
        p99 = statistics.quantiles(health, n=100)[98]
        report.rows += [
            _download_row("warm `/load` vs nginx", warm, goal=1.0, floor=0.8),
            _download_row("cold `/load` vs nginx", cold, goal=0.5, floor=0.5),
            Row(
                "`/upload` vs plain PUT into the hub",
                f"{upload_rates[0]:.2f} GiB/s",
                f"hub PUT {upload_rates[1]:.2f} GiB/s",
                spread(uploads.speedups()),
                ">= 0.8x",
                statistics.median(uploads.speedups()) >= 0.8,
            ),
            Row(
                f"`/health` p99, {HEALTH_DOWNLOADS} downloads running",
                f"{p99 * 1000:.1f} ms",
                "",
                f"p50 {statistics.median(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms"
                f" ({len(health)} probes)",
                "< 25 ms",
                p99 < 0.025,
            ),
            Row(
                "sidecar peak RSS (VmHWM), whole run",
                f"{peak / MIB:.0f} MiB",
                "",
                "",
                "<= 96 MiB",
                peak <= 96 * MIB,
            ),
        ]
        report.notes += [
            (
                f"{machine()}; client curl to /dev/null; nginx {_nginx_version(nginx_bin)}, "
                "1 worker, sendfile on and off (output_buffers 2 1m, tcp_nopush), faster per pair"
            ),
            f"faster nginx per pair: {_wins(warm_wins)} (warm); {_wins(cold_wins)} (cold)",
            "sidecar peak RSS (MiB) after each step: "
            + ", ".join(f"{step} {value / MIB:.0f}" for step, value in peaks.items()),
            (
                "ratios are reference seconds / unlockd seconds per pair (higher is better); "
                "rates are the median of each side"
            ),
        ]
        if args.pairs < 3:
            report.notes.append(f"only {args.pairs} pair(s): SPEC §7 needs at least 3")
        report.print()
    except subprocess.CalledProcessError:
        print(f"sidecar log:\n{sidecar_log.read_text()[-12000:]}", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _nginx_version(nginx_bin: str) -> str:
    result = subprocess.run([nginx_bin, "-v"], capture_output=True, text=True, check=False)
    return result.stderr.strip().rpartition("/")[2]

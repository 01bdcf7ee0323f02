"""`python -m bench wan`: cold /load over an emulated WAN link, as a ratio to the link's rate.

A hub and a sidecar run as processes on loopback; the sidecar reaches the hub's blobs
(``--cdn``) through the link emulator of ``tests/linkemu.py`` (a user-space TCP proxy: this
kernel has no ``netem``), which adds the round-trip time and caps the rate of each connection
and of the whole link. The metadata calls go to the hub directly. For a file of
``BENCH_WAN_MIB`` MiB (default 128) it measures, each from an empty cache:

- what the emulator itself carries unshaped (one curl through it to the blob), so the link
  rate claimed below is one the machine can really carry;
- cold ``/load`` with 1, 4, 8 and 16 connections on a link of ``--rtt`` (40 ms) whose
  per-connection cap is 1/8 of the link's rate (``--link-mib``, 48 MiB/s): the goal is
  >= 0.8x the link's rate with the defaults (8 connections, SPEC §11);
- the same with every connection cut after 4 MiB (goal: <= 2x the fault-free time), and with
  one connection stalled for 60 s (goal: <= the 10 s stall timeout plus a few seconds more).
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
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bench._support import MIB, Report, Row, free_port, machine, process, unlockd

if TYPE_CHECKING:
    from collections.abc import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from linkemu import LinkEmulator, LinkSettings

PUBLISHER = ("bench-publisher@example.com", "bench-publisher-password")
FILENAME = "wan.bin"
STALL_TIMEOUT = 10.0  # the default of UNLOCKD_CDN_STALL_TIMEOUT


def _curl_seconds(*args: str) -> float:
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    return float(result.stdout)


class _Stack:
    """A hub, and sidecars started on demand with a number of CDN connections."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.hub = f"http://127.0.0.1:{free_port()}"
        self.stack = contextlib.ExitStack()

    def start_hub(self) -> None:
        data = self.work / "hub"
        subprocess.run(
            unlockd("hub", "add-user", "--data-dir", str(data), "--email", PUBLISHER[0],
                    "--role", "publisher"),
            env={**self.env, "UNLOCKD_PASSWORD": PUBLISHER[1]}, check=True,
        )  # fmt: skip
        port = self.hub.rsplit(":", 1)[1]
        args = unlockd("hub", "--data-dir", str(data), "--port", port)
        self.stack.enter_context(
            process(args, self.env, f"{self.hub}/health", self.work / "hub.log")
        )

    @contextlib.contextmanager
    def sidecar(self, cdn: str, connections: int) -> Iterator[str]:
        url = f"http://127.0.0.1:{free_port()}"
        cache = self.work / f"cache-{connections}"
        shutil.rmtree(cache, ignore_errors=True)
        args = unlockd(
            "serve", "--port", url.rsplit(":", 1)[1], "--upstream", self.hub, "--cdn", cdn,
            "--cache-dir", str(cache), "--cdn-connections", str(connections),
        )  # fmt: skip
        log = self.work / f"sidecar-{connections}.log"
        with process(args, self.env, f"{url}/health", log):
            httpx.post(
                f"{url}/login", json={"email": PUBLISHER[0], "password": PUBLISHER[1]}, timeout=60
            ).raise_for_status()
            yield url

    def cold_load(self, sidecar: str) -> float:
        """Seconds of one ``/load`` from an empty cache (the last fill must have ended)."""
        for cache in self.work.glob("cache-*"):
            while any(entry.name.startswith(".") for entry in cache.iterdir()):
                time.sleep(0.05)
            for entry in cache.iterdir():
                entry.unlink()
        return _curl_seconds("-X", "POST", f"{sidecar}/load/{FILENAME}")


def main(argv: list[str]) -> int:
    """Run the benchmark and print a table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench wan")
    parser.add_argument("--rtt", type=float, default=0.040, help="round trip, s (default 0.04)")
    parser.add_argument("--link-mib", type=float, default=48.0, help="link rate, MiB/s")
    parser.add_argument("--runs", type=int, default=3, help="runs of the default row (median)")
    args = parser.parse_args(argv)
    size_mib = int(os.environ.get("BENCH_WAN_MIB", "128"))
    link_rate = args.link_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="unlockd-bench-wan-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLOCKD_")}
    report = Report(
        f"`python -m bench wan`: {size_mib} MiB, link {args.link_mib:g} MiB/s, "
        f"RTT {args.rtt * 1000:g} ms, {args.link_mib / 8:g} MiB/s per connection",
        f"BENCH_WAN_MIB={size_mib} python -m bench wan",
    )
    stack = _Stack(work, env)
    try:
        with stack.stack:
            stack.start_hub()
            hub = httpx.URL(stack.hub)
            link = LinkEmulator(hub.host, hub.port or 80, LinkSettings())
            with link.running(), stack.sidecar(link.url, 8) as sidecar:
                plain = work / FILENAME
                with plain.open("wb") as f:
                    for _ in range(size_mib):
                        f.write(os.urandom(MIB))
                subprocess.run(
                    ["curl", "-sS", "--fail", "-o", "/dev/null", "-F", f"data=@{plain}",
                     f"{sidecar}/upload/{FILENAME}"], check=True,
                )  # fmt: skip
                plain.unlink()
                token = httpx.post(
                    f"{stack.hub}/auth/login",
                    json={"email": PUBLISHER[0], "password": PUBLISHER[1]},
                ).json()["token"]
                meta = httpx.get(
                    f"{stack.hub}/resources/models/{FILENAME}",
                    headers={"Authorization": f"Bearer {token}"},
                ).json()
                blob_url = f"{link.url}/blobs/{meta['etag']}"
                big = meta["big_size"]
                carried = big / _curl_seconds(blob_url)
                report.rows.append(
                    Row("emulator, unshaped (curl)", f"{carried / MIB:.0f} MiB/s", "", "", "", None)
                )
                if carried < 2 * link_rate:
                    report.notes.append("the emulator carries less than twice the link rate")

            link.settings = LinkSettings(
                rtt=args.rtt, link_rate=link_rate, connection_rate=link_rate / 8
            )
            fault_free = 0.0
            with link.running():
                for connections in (1, 4, 8, 16):
                    with stack.sidecar(link.url, connections) as sidecar:
                        runs = args.runs if connections == 8 else 1
                        times = [stack.cold_load(sidecar) for _ in range(runs)]
                        seconds = statistics.median(times)
                        ratio = big / seconds / link_rate
                        goal = ">= 0.8x" if connections == 8 else ""
                        report.rows.append(
                            Row(
                                f"cold /load, {connections} connection{'s' * (connections > 1)}",
                                f"{big / seconds / MIB:.1f} MiB/s",
                                f"link {args.link_mib:g} MiB/s",
                                f"{ratio:.2f}x" + (f" (median of {runs})" if runs > 1 else ""),
                                goal,
                                ratio >= 0.8 if goal else None,
                            )
                        )
                        if connections == 8:
                            fault_free = seconds
                            link.settings.cut_after = 4 * MIB
                            cut = stack.cold_load(sidecar)
                            link.settings.cut_after = None
                            report.rows.append(
                                Row(
                                    "cold /load, every connection cut after 4 MiB",
                                    f"{cut:.1f} s",
                                    f"fault-free {fault_free:.1f} s",
                                    f"{cut / fault_free:.2f}x the time",
                                    "<= 2x",
                                    cut <= 2 * fault_free,
                                )
                            )
                            link.settings.stall_after, link.settings.stall_seconds = 8 * MIB, 60.0
                            link.reset_faults()
                            stalled = stack.cold_load(sidecar)
                            link.settings.stall_after = None
                            extra = stalled - fault_free
                            report.rows.append(
                                Row(
                                    "cold /load, one connection stalled 60 s",
                                    f"{stalled:.1f} s",
                                    f"fault-free {fault_free:.1f} s",
                                    f"+{extra:.1f} s",
                                    f"<= +{STALL_TIMEOUT:g} s and a few",
                                    extra <= STALL_TIMEOUT + 5,
                                )
                            )
        report.notes.append(machine())
        report.notes.append(
            "each run from an empty cache; the metadata goes to the hub directly, blob bytes "
            "through the emulator"
        )
        report.print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0

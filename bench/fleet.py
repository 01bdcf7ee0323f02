"""`python -m bench fleet`: a fleet of sidecars cold-loading one model from two hubs on S3.

Two ``unlockd hub`` processes share one PostgreSQL database and one S3 bucket (the real
services of ``.ci/fleet start``: PostgreSQL and Ceph's radosgw, found through
``UNLOCKD_TEST_DATABASE`` and ``AWS_*``; a database and a bucket of this run's own are created
and dropped). nginx balances them (``proxy_pass`` to an upstream of the two, as in
docs/deploy.md). A fleet of ``--devices`` sidecar processes (default 16: what two cores carry
with room to spare; the goal asks for at least 12) all point at nginx. One model of
``BENCH_FLEET_MIB`` MiB (default 128) is uploaded once; then each of ``--rounds`` rounds
(default 3) empties every device's cache and, alternately (A, B):

- A: every device cold-loads the model at once (``curl -X POST /load`` to /dev/null): the
  aggregate rate (devices x size / the time until the last one ends), each device's seconds
  (p50 and p99 over all rounds), and the CPU seconds of the hubs (utime + stime from
  ``/proc/PID/stat``), nginx, the store (radosgw + its OSD) and the sidecars during the loads;
- B: the same number of curls fetch the big part straight from its presigned URL at once:
  what the store alone delivers here, the reference of the aggregate rate;
- C: the same number of curls fetch a blob of the same size at once from a third hub, the
  embedded default (SQLite + a blob directory), which serves every byte itself: the reference
  of the hubs' CPU per GiB.

Blob bytes go from the store to the devices through presigned URLs, so the fleet hubs' CPU
seconds per GiB delivered should be near zero: the goal is <= 0.1x what the embedded hub
spends per GiB it serves itself (what is left is one metadata request per load, so the
figure falls as the model grows; the table also gives it per load). Their memory should be
flat in the bytes delivered (VmHWM - VmRSS before the loads, per GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench._support import GIB, MIB, Report, Row, free_port, machine, memory, process, unlockd

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PUBLISHER = ("bench-publisher@example.com", "bench-publisher-password")
READER = ("bench-reader@example.com", "bench-reader-password")
FILENAME = "fleet.bin"
_VARIABLES = ("UNLOCKD_TEST_DATABASE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    log_format upstream "$upstream_addr $request";
    access_log {work}/nginx-access.log upstream;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream unlockd_hubs {{
        server 127.0.0.1:{hub1};
        server 127.0.0.1:{hub2};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {{
            proxy_pass http://unlockd_hubs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class _Cpu:
    """CPU seconds of groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.totals = dict.fromkeys(groups, 0.0)
        self._marks: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._marks = self._now()

    def stop(self) -> None:
        for name, value in self._now().items():
            self.totals[name] += value - self._marks[name]


def _at_once(count: int, job: Callable[[int], float]) -> tuple[list[float], float]:
    """Run ``job(i)`` for ``count`` devices from one barrier; their seconds, and the wall time."""
    barrier = threading.Barrier(count + 1)

    def run(index: int) -> tuple[float, float]:
        barrier.wait()
        began = time.monotonic()
        seconds = job(index)
        return seconds, began + seconds

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(run, i) for i in range(count)]
        barrier.wait()
        began = time.monotonic()
        results = [future.result() for future in futures]
    return [seconds for seconds, _ in results], max(end for _, end in results) - began


def _curl(*args: str, size: int) -> float:
    """Run curl to /dev/null; return its total seconds, checking that ``size`` bytes came."""
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download}",
         *args],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    seconds, received = result.stdout.split()
    if int(received) != size:
        msg = f"curl {args[-1][:80]}: received {received} bytes, expected {size}"
        raise RuntimeError(msg)
    return float(seconds)


# -- the database and the bucket of this run ----------------------------------------------------


async def _admin(admin_url: str, statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - a test dependency

    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def _database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the server of ``admin_url``, dropped afterwards."""
    name = f"bench_{secrets.token_hex(6)}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


def _s3(env: dict[str, str]) -> Any:
    from botocore.config import Config  # noqa: PLC0415 - a test dependency, needed only here
    from botocore.session import get_session  # noqa: PLC0415

    return get_session().create_client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )


@contextlib.contextmanager
def _bucket(env: dict[str, str]) -> Iterator[str]:
    """A fresh bucket, emptied and removed afterwards."""
    s3 = _s3(env)
    name = f"bench-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for item in s3.list_objects_v2(Bucket=name).get("Contents", []):
            s3.delete_object(Bucket=name, Key=item["Key"])
        s3.delete_bucket(Bucket=name)
        s3.close()


def _store_pids() -> list[int]:
    """radosgw's and the OSD's pids, when ``.ci/fleet`` started them (else none)."""
    run = Path(os.environ.get("UNLOCKD_FLEET_DIR", "/nonexistent")) / "ceph" / "run"
    pids = []
    for name in ("client.rgw.pid", "osd.0.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((run / name).read_text())
            if Path(f"/proc/{pid}").exists():
                pids.append(pid)
    return pids


# -- the fleet ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _sidecars(
    count: int, upstream: str, work: Path, env: dict[str, str]
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """``count`` sidecar processes in front of ``upstream``, started together; (url, process)."""
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for index in range(count):
            port = free_port()
            args = unlockd(
                "serve", "--port", str(port), "--upstream", upstream,
                "--cache-dir", str(work / f"cache-{index}"),
            )  # fmt: skip
            with (work / f"sidecar-{index}.log").open("wb") as log:
                proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
            started.append((f"http://127.0.0.1:{port}", proc))
        deadline = time.monotonic() + 120
        for url, proc in started:
            while True:
                if proc.poll() is not None:
                    msg = f"sidecar {url} exited: see {work}/sidecar-*.log"
                    raise RuntimeError(msg)
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    msg = f"sidecar {url} did not start"
                    raise RuntimeError(msg)
                time.sleep(0.05)
        yield started
    finally:
        for _, proc in started:
            proc.terminate()
        for _, proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _login(url: str, account: tuple[str, str]) -> None:
    email, password = account
    reply = httpx.post(f"{url}/login", json={"email": email, "password": password}, timeout=60)
    reply.raise_for_status()


def _empty_caches(work: Path) -> None:
    """Remove every device's cache entry once its fill has ended, then flush the page cache's
    dirty pages, so the writeback of one round does not land in the next."""
    for cache in work.glob("cache-*"):
        deadline = time.monotonic() + 60
        while any(entry.name.startswith(".") for entry in cache.iterdir()):
            if time.monotonic() > deadline:
                msg = f"{cache}: a fill did not end"
                raise RuntimeError(msg)
            time.sleep(0.05)
        for entry in cache.iterdir():
            if entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry)
    subprocess.run(["sync"], check=True)


def _publish_plain(hub: str, path: Path) -> str:
    """Publish the bytes of ``path`` as a big part at ``hub``; return its etag."""
    email, password = PUBLISHER
    token = httpx.post(f"{hub}/auth/login", json={"email": email, "password": password})
    headers = {"Authorization": f"Bearer {token.json()['token']}"}
    with httpx.Client(base_url=hub, headers=headers, timeout=600) as client:
        upload_id = client.post("/uploads").json()["upload_id"]
        with path.open("rb") as body:
            client.put(f"/uploads/{upload_id}", content=body).raise_for_status()
        key, small = base64.b64encode(bytes(32)).decode(), base64.b64encode(b"s").decode()
        reply = client.put(
            f"/resources/models/{path.name}",
            json={"upload_id": upload_id, "key": key, "small": small},
        )
        reply.raise_for_status()
        etag: str = reply.json()["etag"]
    return etag


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _requests_per_hub(work: Path, ports: list[int]) -> str:
    """How many requests for ``/resources`` nginx passed to each hub (from its access log)."""
    lines = (work / "nginx-access.log").read_text().splitlines()
    counts = [
        sum(line.startswith(f"127.0.0.1:{port} GET /resources/") for line in lines)
        for port in ports
    ]
    return "/".join(map(str, counts))


def main(argv: list[str]) -> int:  # noqa: C901 - one linear script
    """Run the benchmark and print a table; return 0."""
    parser = argparse.ArgumentParser(prog="python -m bench fleet")
    parser.add_argument("--devices", type=int, default=16, help="sidecar processes (16)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (3)")
    args = parser.parse_args(argv)
    if args.devices < 2 or args.rounds < 1:
        parser.error("--devices must be at least 2 and --rounds at least 1")
    if missing := [name for name in _VARIABLES if not os.environ.get(name)]:
        msg = (
            f"needs PostgreSQL and an S3 store ({', '.join(missing)} unset): "
            'eval "$(.ci/fleet start)"'
        )
        raise SystemExit(msg)
    nginx_bin = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx_bin is None:
        msg = "nginx balances the hubs in this benchmark and is not installed (apt install nginx)"
        raise SystemExit(msg)
    size_mib = int(os.environ.get("BENCH_FLEET_MIB", "128"))
    size = size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="unlockd-bench-fleet-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("UNLOCKD_")}
    devices = args.devices
    report = Report(
        f"`python -m bench fleet`: {devices} sidecars cold-load one {size_mib} MiB model at once "
        f"from 2 hubs behind nginx on PostgreSQL + S3 (radosgw), {args.rounds} rounds",
        f"BENCH_FLEET_MIB={size_mib} python -m bench fleet"
        + (f" -- {' '.join(argv)}" if argv else ""),
    )
    try:
        with (
            _database(os.environ["UNLOCKD_TEST_DATABASE"]) as database,
            _bucket(base_env) as bucket,
            contextlib.ExitStack() as stack,
        ):
            # In the environment, not argv: the URL holds the database password.
            env = {
                **base_env,
                "UNLOCKD_HUB_DATABASE": database,
                "UNLOCKD_HUB_BLOBS": f"s3://{bucket}/bench",
            }
            for account, role in ((PUBLISHER, "publisher"), (READER, "reader")):
                subprocess.run(
                    unlockd("hub", "add-user", "--email", account[0], "--role", role),
                    env={**env, "UNLOCKD_PASSWORD": account[1]},
                    check=True,
                    stderr=subprocess.DEVNULL,
                )
            hub_ports = [free_port(), free_port()]
            hubs = [
                stack.enter_context(
                    process(
                        unlockd("hub", "--port", str(port)),
                        env,
                        f"http://127.0.0.1:{port}/health",
                        work / f"hub-{index}.log",
                    )
                )
                for index, port in enumerate(hub_ports, 1)
            ]
            nginx_port = free_port()
            conf = work / "nginx.conf"
            conf.write_text(
                _NGINX_CONF.format(work=work, port=nginx_port, hub1=hub_ports[0], hub2=hub_ports[1])
            )
            upstream = f"http://127.0.0.1:{nginx_port}"
            nginx = stack.enter_context(
                process([nginx_bin, "-c", str(conf)], env, f"{upstream}/health", work / "nginx.log")
            )
            embedded_port = free_port()
            embedded = f"http://127.0.0.1:{embedded_port}"
            subprocess.run(
                unlockd("hub", "add-user", "--data-dir", str(work / "embedded"),
                        "--email", PUBLISHER[0], "--role", "publisher"),
                env={**base_env, "UNLOCKD_PASSWORD": PUBLISHER[1]},
                check=True, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            embedded_hub = stack.enter_context(
                process(
                    unlockd(
                        "hub", "--data-dir", str(work / "embedded"), "--port", str(embedded_port)
                    ),
                    base_env,
                    f"{embedded}/health",
                    work / "hub-embedded.log",
                )
            )
            fleet = stack.enter_context(_sidecars(devices, upstream, work, base_env))
            print(f"  {devices} sidecars up; uploading {size_mib} MiB", flush=True)
            plain = work / FILENAME
            with plain.open("wb") as file:
                for _ in range(size_mib):
                    file.write(os.urandom(MIB))
            first = fleet[0][0]
            _login(first, PUBLISHER)
            subprocess.run(
                ["curl", "-sS", "--fail", "-o", "/dev/null", "-F", f"data=@{plain}",
                 f"{first}/upload/{FILENAME}"], check=True, timeout=600,
            )  # fmt: skip
            embedded_blob = f"{embedded}/blobs/{_publish_plain(embedded, plain)}"
            plain.unlink()
            for url, _ in fleet:
                _login(url, READER)
            token = httpx.post(
                f"{upstream}/auth/login", json={"email": READER[0], "password": READER[1]}
            ).json()["token"]
            resource = httpx.get(
                f"{upstream}/resources/models/{FILENAME}",
                headers={"Authorization": f"Bearer {token}"},
            ).json()
            big_url, big = resource["big_url"], resource["big_size"]
            if not big_url.startswith(env["AWS_ENDPOINT_URL"]):
                msg = f"big_url is not a presigned URL of the store: {big_url[:80]}"
                raise RuntimeError(msg)

            cpu = _Cpu(
                {
                    "hubs": [hub.pid for hub in hubs],
                    "nginx": [nginx.pid],
                    "store": _store_pids(),
                    "sidecars": [proc.pid for _, proc in fleet],
                }
            )
            embedded_cpu = _Cpu({"hub": [embedded_hub.pid]})
            rss_before = [memory(hub.pid)["VmRSS"] for hub in hubs]
            loads: list[float] = []
            walls: list[float] = []
            direct_walls: list[float] = []
            for round_ in range(1, args.rounds + 1):
                _empty_caches(work)
                cpu.start()
                seconds, wall = _at_once(
                    devices,
                    lambda i: _curl("-X", "POST", f"{fleet[i][0]}/load/{FILENAME}", size=size),
                )
                cpu.stop()
                loads += seconds
                walls.append(wall)
                _, direct = _at_once(devices, lambda _i: _curl(big_url, size=big))
                direct_walls.append(direct)
                embedded_cpu.start()
                _at_once(devices, lambda _i: _curl(embedded_blob, size=size))
                embedded_cpu.stop()
                print(
                    f"  round {round_}/{args.rounds}: fleet {devices * size / wall / GIB:.2f} GiB/s"
                    f" (slowest device {max(seconds):.1f} s), store alone "
                    f"{devices * big / direct / GIB:.2f} GiB/s",
                    flush=True,
                )
            peaks = [memory(hub.pid)["VmHWM"] for hub in hubs]
            requests = _requests_per_hub(work, hub_ports)

        delivered = devices * size * args.rounds / GIB
        per_gib = {name: total / delivered for name, total in cpu.totals.items()}
        embedded_per_gib = embedded_cpu.totals["hub"] / delivered
        ratios = [
            (devices * size / wall) / (devices * big / direct)
            for wall, direct in zip(walls, direct_walls, strict=True)
        ]
        wall = statistics.median(walls)
        direct = statistics.median(direct_walls)
        growth = max(peak - before for peak, before in zip(peaks, rss_before, strict=True))
        report.rows += [
            Row(
                f"aggregate cold `/load`, {devices} devices at once",
                f"{devices * size / wall / GIB:.2f} GiB/s",
                f"store alone {devices * big / direct / GIB:.2f} GiB/s",
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                "",
                None,
            ),
            Row(
                "per device, seconds to load",
                f"p50 {statistics.median(loads):.2f} s",
                "",
                f"p99 {_quantile(loads, 99):.2f} s, max {max(loads):.2f} s ({len(loads)} loads)",
                "",
                None,
            ),
            Row(
                "hubs' CPU per GiB delivered (2 hubs)",
                f"{per_gib['hubs']:.3f} s/GiB",
                f"embedded hub {embedded_per_gib:.3f} s/GiB",
                f"{per_gib['hubs'] / embedded_per_gib:.3f}x; "
                f"{cpu.totals['hubs'] * 1000 / (devices * args.rounds):.1f} ms per device load",
                "<= 0.1x",
                per_gib["hubs"] <= 0.1 * embedded_per_gib,
            ),
            Row(
                "hubs' RSS growth per GiB delivered",
                f"{growth / MIB / delivered:.2f} MiB/GiB",
                "",
                "peak RSS " + " / ".join(f"{peak / MIB:.0f} MiB" for peak in peaks),
                "~0 (flat)",
                growth / MIB / delivered <= 1.0,
            ),
        ]
        for name, what in (
            ("nginx", "nginx's CPU per GiB (metadata only)"),
            ("store", "store's CPU per GiB (radosgw + OSD)"),
            ("sidecars", f"sidecars' CPU per GiB ({devices} processes)"),
        ):
            if cpu.groups[name]:
                report.rows.append(Row(what, f"{per_gib[name]:.3f} s/GiB", "", "", "", None))
        report.notes += [
            (
                f"{machine()}; every process (store, database, hubs, nginx, {devices} "
                "sidecars, curl) on this one machine; devices' caches on one disk"
            ),
            (
                f"{delivered:.1f} GiB delivered in all; /resources requests per hub: "
                f"{requests}; per round: the fleet's loads, the store alone, the embedded hub"
            ),
            (
                "the store alone: the same number of curls of the presigned big_url at once, "
                "alternated with the fleet's rounds; ratios per round"
            ),
        ]
        report.print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the benchmarks share: alternated pairs, the report table, our CLI as a subprocess.

A ratio means something only when both sides ran in the same run, interleaved, so that a slow
moment of a shared machine hits both alike (SPEC §7): :func:`alternate` runs A, B, A, B, …
and keeps the pairs; :class:`Pairs` reduces them to the median of the per-pair ratios;
:class:`Report` prints one Markdown table with the goal and a mark beside each row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

GIB = 1 << 30
MIB = 1 << 20

A = TypeVar("A")
B = TypeVar("B")


def alternate(
    first: Callable[[], A],
    second: Callable[[], B],
    pairs: int,
    progress: Callable[[int, A, B], None] | None = None,
) -> list[tuple[A, B]]:
    """Run ``first`` then ``second``, ``pairs`` times over; return the results as pairs.

    ``progress(index, a, b)`` is called after each pair (1-based), to show a long run moving.
    """
    results = []
    for index in range(1, pairs + 1):
        a = first()
        b = second()
        results.append((a, b))
        if progress is not None:
            progress(index, a, b)
    return results


def bench_pairs(default: int = 5) -> int:
    """The default number of pairs: ``BENCH_PAIRS`` from the environment, else ``default``."""
    return int(os.environ.get("BENCH_PAIRS", default))


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Seconds taken by ``ours`` and by the ``reference``, pair by pair, for ``size`` bytes."""

    size: int
    seconds: Sequence[tuple[float, float]]

    def speedups(self) -> list[float]:
        """Per pair, how many times faster ours ran than the reference (reference / ours)."""
        return [reference / ours for ours, reference in self.seconds]

    def slowdowns(self) -> list[float]:
        """Per pair, how many times longer ours took than the reference (ours / reference)."""
        return [ours / reference for ours, reference in self.seconds]

    def rates(self) -> tuple[float, float]:
        """Median throughputs of ours and of the reference, in GiB/s."""
        return (
            self.size / statistics.median(ours for ours, _ in self.seconds) / GIB,
            self.size / statistics.median(reference for _, reference in self.seconds) / GIB,
        )


def spread(values: Sequence[float]) -> str:
    """``medianx (min-max)`` of some ratios."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the report; ``met`` is None for a figure with no goal, "floor" in between."""

    measure: str
    ours: str
    reference: str
    result: str
    goal: str
    met: bool | str | None


_MARKS = {True: "met", False: "MISSED", "floor": "floor only", None: ""}


@dataclasses.dataclass
class Report:
    """The rows of one benchmark, printed as a Markdown table, then notes and how to rerun."""

    title: str
    command: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def print(self) -> None:
        """Print the table, the notes and the command line that reproduces it."""
        header = ("measure", "unlockd", "reference", "result (median, min-max)", "goal", "")
        cells = [header] + [
            (r.measure, r.ours, r.reference, r.result, r.goal, _MARKS[r.met]) for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

        print(f"\n{self.title}\n")
        print(line(header))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in cells[1:]:
            print(line(row))
        print()
        for note in self.notes:
            print(f"- {note}")
        print(f"\nreproduce: {self.command}", flush=True)


def command(benchmark: str, argv: Sequence[str], gib: float) -> str:
    """The shell command that reruns ``benchmark`` with these arguments and this size."""
    args = f" -- {shlex.join(argv)}" if argv else ""
    return f"BENCH_GIB={gib:g} python -m bench {benchmark}{args}"


def machine() -> str:
    """A short description of where the figures were taken (cores, load)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load} at the end"


def rate(size: int, seconds: float) -> str:
    """``size`` bytes in ``seconds``, in GiB/s."""
    return f"{size / seconds / GIB:.2f} GiB/s"


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Stop with a clear message when ``directory`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        msg = (
            f"not enough free space in {directory} for {what}: needs about "
            f"{needed / GIB:.1f} GiB, {free / GIB:.1f} GiB free (lower BENCH_GIB or set TMPDIR)"
        )
        raise SystemExit(msg)


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

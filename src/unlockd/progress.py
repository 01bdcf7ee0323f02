"""A one-line progress bar on stderr for long CLI work (encrypt, decrypt, seal).

It draws only when its stream is a terminal, so pipes, logs and tests see nothing::

    with Progress(total=size, label="decrypt") as progress:
        for chunk in chunks:
            progress.advance(len(chunk))
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TYPE_CHECKING, Self, TextIO

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Progress", "format_size"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(size: float) -> str:
    """Format a byte count with a binary unit: ``1.5 MiB``."""
    for unit in _UNITS[:-1]:
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} {_UNITS[-1]}"


class Progress:
    """Bytes done (of ``total`` when known) and the rate, redrawn at most every ``interval`` s."""

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        stream: TextIO | None = None,
        interval: float = 0.1,
    ) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._interval = interval
        self._enabled = _isatty(self._stream)
        self._started = self._drawn = time.monotonic()

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._draw()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._enabled:
            self._draw()
            # End the line, so that a message printed after us starts on its own.
            self._stream.write("\n")
            self._stream.flush()

    def advance(self, n: int) -> None:
        """Count ``n`` more bytes done; redraw if the last drawing is old enough."""
        self.done += n
        if self._enabled and time.monotonic() - self._drawn >= self._interval:
            self._draw()

    def render(self, width: int) -> str:
        """Return the bar as text of at most ``width`` characters."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = f"{format_size(self.done / elapsed)}/s"
        if self.total is None:
            return f"{self.label} {format_size(self.done)} {rate}"[:width]
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        figures = f"{fraction:4.0%} {format_size(self.done)} / {format_size(self.total)} {rate}"
        room = width - len(self.label) - len(figures) - 4
        if room < 10:
            return f"{self.label} {figures}"[:width]
        filled = int(room * fraction)
        return f"{self.label} [{'#' * filled}{'-' * (room - filled)}] {figures}"

    def _draw(self) -> None:
        if not self._enabled:
            return
        self._drawn = time.monotonic()
        width = shutil.get_terminal_size().columns - 1
        # Carriage return and erase-to-end-of-line: redraw in place.
        self._stream.write(f"\r{self.render(width)}\x1b[K")
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False

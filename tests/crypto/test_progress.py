"""The CLI progress bar: drawn on a terminal only, with sizes, percentage and rate."""

from __future__ import annotations

import io
import os
import pty

from unlockd.progress import Progress, format_size


def test_progress_format_size_binary_units():
    """Sizes read in B, KiB, MiB, GiB."""
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 << 30) == "3.0 GiB"


def test_progress_not_a_terminal_writes_nothing():
    """On a pipe or file the bar stays silent, whatever happens."""
    stream = io.StringIO()
    with Progress(100, "encrypt", stream=stream, interval=0) as progress:
        progress.advance(50)
        progress.advance(50)
    assert stream.getvalue() == ""


def test_progress_render_with_and_without_total():
    """A known total gives a bar and a percentage; an unknown one gives bytes and a rate."""
    progress = Progress(4 << 20, "decrypt", stream=io.StringIO())
    progress.advance(1 << 20)
    line = progress.render(80)
    assert line.startswith("decrypt [")
    assert " 25% 1.0 MiB / 4.0 MiB " in line
    assert line.endswith("/s")
    assert len(line) <= 80
    assert Progress(None, "seal", stream=io.StringIO()).render(80).startswith("seal 0 B ")
    assert len(progress.render(20)) <= 20


def test_progress_terminal_redraws_in_place_and_ends_line():
    """On a terminal the bar is redrawn with carriage returns and ends with a newline."""
    controller, terminal = pty.openpty()
    try:
        with (
            os.fdopen(terminal, "w") as stream,
            Progress(1000, "encrypt", stream=stream, interval=0) as progress,
        ):
            progress.advance(500)
            progress.advance(500)
        drawn = _read_all(controller).decode()
    finally:
        os.close(controller)
    assert drawn.count("\r") >= 3
    assert "50%" in drawn
    assert "100%" in drawn
    assert drawn.endswith("\n")


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        try:
            piece = os.read(fd, 65536)
        except OSError:  # EIO once the terminal side is closed and drained
            return data
        if not piece:
            return data
        data += piece

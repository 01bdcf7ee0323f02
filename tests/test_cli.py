import subprocess
import sys

import pytest

from unlockd.cli import main


def test_cli_version_prints_and_exits_zero(capsys):
    """`unlockd --version` names the version."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "unlockd 0.1.0" in capsys.readouterr().out


def test_cli_module_entry_point_shows_help():
    """`python -m unlockd --help` lists every subcommand."""
    out = subprocess.run(
        [sys.executable, "-m", "unlockd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("serve", "hub", "seal", "keygen", "encrypt", "decrypt", "dev"):
        assert command in out

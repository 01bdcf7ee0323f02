"""Run benchmarks: ``python -m bench [NAME [ARGS...]]``; every ``bench/<name>.py`` when none.

Each benchmark is a module ``bench/<name>.py`` with ``main(argv: list[str]) -> int`` that
prints its own table at the end. ``python -m bench crypto sidecar`` runs those two;
``python -m bench sidecar -- --pairs 3`` passes the arguments after ``--`` to each named
benchmark. ``BENCH_GIB`` scales the data sizes (default 1); ``BENCH_PAIRS`` sets the number of
alternated pairs of the benchmarks that take ``--pairs``. A benchmark that cannot run here (no
nginx, not enough disk) says why and the others still run.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def _known() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    """Run the named benchmarks (all when none); return the worst exit status."""
    names, rest = argv, []
    if "--" in argv:
        split = argv.index("--")
        names, rest = argv[:split], argv[split + 1 :]
    known = _known()
    if unknown := [name for name in names if name not in known]:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    status = 0
    for name in names or known:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name}", flush=True)
        try:
            status = max(status, int(module.main(list(rest))))
        except SystemExit as exc:
            # argparse errors and "cannot run here" stop one benchmark, not the whole run.
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            status = max(status, 1 if isinstance(exc.code, str) else int(exc.code or 0))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

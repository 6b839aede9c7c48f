#!/usr/bin/env python3
"""``make bench``: run every benchmark in turn and print their figures.

Each entry is a script of this directory with its arguments; add yours to BENCHES.
Arguments given to this script are passed to every benchmark (e.g. ``--duration 5``)
only when the benchmark's entry says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (script, fixed arguments, whether it takes this script's own arguments)
BENCHES: list[tuple[str, list[str], bool]] = [
    ("datapath.py", [], True),
    ("trs_forward.py", [], True),
    ("nms_load.py", [], False),
    ("as_enrolment.py", [], False),
    ("route_setup.py", ["--rounds", "5"], False),
    ("mobility.py", [], False),
    ("relay_vs_direct.py", [], False),
]


def main(argv: list[str]) -> int:
    worst = 0
    for script, args, takes_argv in BENCHES:
        print(f"== {script}", flush=True)
        cmd = [sys.executable, str(HERE / script), *args, *(argv if takes_argv else [])]
        worst = max(worst, subprocess.run(cmd, check=False).returncode)
    return worst


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The ``mobile`` fixture: a move case's bed with AS, NMS and TRS serving (embedded default)
and the agents of alice and bob up. Logs are printed at the end; the bed is always removed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed.mobility import MobileOverlay, MoveCase, start_overlay
from cyphonic_testbed.overlay import trs_endpoints


@pytest.fixture
def mobile(netbed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[MobileOverlay] = []
    beds: list[Any] = []

    def make(case: MoveCase) -> MobileOverlay:
        bed = netbed(case.topology())
        beds.append(bed)
        os.chmod(tmp_path, 0o755)
        # No Redis on the embedded default: the NMS is told the one TRS (restored after).
        monkeypatch.setenv("CYPHONIC_TRS_ENDPOINTS", json.dumps(trs_endpoints(bed.host("trs"))))
        made.append(start_overlay(bed, workdir=tmp_path / "overlay"))
        return made[-1]

    try:
        yield make
    finally:
        for o in made:
            for agent in o.services.agents:
                sys.stderr.write(
                    f"\n--- agent {agent.name} log (tail) ---\n{agent.log_text()[-6000:]}\n"
                )
            for name in ("nms", "trs trs"):
                log = o.services.log(name) if name == "nms" else o.services.workdir / "trs-trs.log"
                text = log.read_text(errors="replace") if log.exists() else ""
                sys.stderr.write(f"\n--- {name} log (tail) ---\n{text[-3000:]}\n")
            o.services.stop()

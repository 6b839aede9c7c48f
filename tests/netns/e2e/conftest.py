"""The ``overlay`` fixture: a test bed with the AS and NMS running and both nodes enrolled."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cyphonic_testbed import Topology
from cyphonic_testbed.overlay import start_services
from e2e_harness import Overlay


@pytest.fixture
def overlay(netbed: Any, tmp_path: Path) -> Iterator[Any]:
    """``overlay(topology)``: build the bed, start AS and NMS, enrol alice and bob (agents
    are started by the test). Logs are printed at the end; the bed is always removed."""
    made: list[Overlay] = []

    def make(topology: Topology) -> Overlay:
        bed = netbed(topology)
        os.chmod(tmp_path, 0o755)
        services = start_services(bed, workdir=tmp_path / "overlay")
        states = services.enrol_all([bed.host("alice"), bed.host("bob")])
        made.append(Overlay(bed=bed, services=services, states=states, agents={}))
        return made[-1]

    yield make
    for o in made:
        for agent in o.services.agents:
            sys.stderr.write(
                f"\n--- agent {agent.name} log (tail) ---\n{agent.log_text()[-5000:]}\n"
            )
        for name in ("as", "nms"):
            log = o.services.log(name)
            text = log.read_text(errors="replace") if log.exists() else ""
            sys.stderr.write(f"\n--- {name} log (tail) ---\n{text[-3000:]}\n")

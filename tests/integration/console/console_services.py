"""Real ``cyphonic-as``, ``cyphonic-trs`` and ``cyphonic-nms`` processes on loopback for the
console test: one PKI made by ``cyphonic-as init-pki``, one registry (the test's PostgreSQL
database), one Redis (the TRS directory and CID table, NMS presence and routes, under a key
prefix of this run). The NMS is told where the AS and the TRS admin APIs are, as an
operator would (CYPHONIC_AS_URL, CYPHONIC_TRS_ADMIN_URLS)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cyphonic_testing.processes import CliService as Service
from cyphonic_testing.processes import start_cli_service as start_service

BIN = Path(sys.executable).parent
DOMAIN = "cyphonic.internal"
ADMIN_TOKEN = "console-admin-token-0123456789abcdef"  # shared by the three services


@dataclass
class Services:
    """The three services of one test, and the admin token they share."""

    tmp: Path
    token: str
    pki: Path
    auth: Service | None = None
    trs: Service | None = None
    nms: Service | None = None
    started: list[Service] = field(default_factory=list)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, *, database_url: str, redis_url: str) -> None:
        subprocess.run(
            [BIN / "cyphonic-as", "init-pki", "--pki-dir", str(self.pki)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        common = {
            "CYPHONIC_PKI_DIR": str(self.pki),
            "CYPHONIC_ADMIN_TOKEN": self.token,
            "CYPHONIC_DOMAIN": DOMAIN,
        }
        shared = {
            "CYPHONIC_REDIS_URL": redis_url,
            "CYPHONIC_REDIS_PREFIX": f"console-{secrets.token_hex(4)}:",
            "CYPHONIC_RELAY_TOKEN_SECRET": secrets.token_hex(24),
        }
        self.auth = start_service(
            "as",
            ["--migrate"],
            env={**common, "CYPHONIC_DATABASE_URL": database_url},
            tmp=self.tmp,
        )
        self.started.append(self.auth)
        self.trs = start_service(
            "trs",
            ["--as-url", self.auth.url],
            env={**common, **shared, "CYPHONIC_REVOCATION_REFRESH_S": "0.5"},
            tmp=self.tmp,
        )
        self.started.append(self.trs)
        self.nms = start_service(
            "nms",
            ["--replica-id", "nms-1"],
            env={
                **common,
                **shared,
                "CYPHONIC_DATABASE_URL": database_url,
                "CYPHONIC_AS_URL": self.auth.url,
                "CYPHONIC_TRS_ADMIN_URLS": json.dumps([self.trs.url]),
                "CYPHONIC_REVOCATION_POLL_S": "0.5",
            },
            tmp=self.tmp,
            quic_host="::",  # dual-stack: nodes on 127.0.0.1 and on ::1
        )
        self.started.append(self.nms)

    def stop(self) -> list[tuple[str, int | None]]:
        """Stop in reverse order; each service's exit status."""
        return [(s.name, s.stop()) for s in reversed(self.started)]

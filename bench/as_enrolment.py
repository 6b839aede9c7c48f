#!/usr/bin/env python3
"""Enrolments per second through a real ``cyphonic-as serve`` process.

Starts the AS on loopback against a throw-away PostgreSQL database (created on the server
at --postgres, dropped afterwards) or a SQLite file (--sqlite), creates --count nodes and
tokens over the admin REST API, makes every key and CSR up front, then times only the
enrolments: --concurrency clients POST /v1/enrol at once. Prints enrolments/s and the
latency percentiles. The client shares the machine with the AS, as on a real 2-core box.

    uv run --frozen python bench/as_enrolment.py --count 500 --concurrency 20
    uv run --frozen python bench/as_enrolment.py --sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
from cryptography.hazmat.primitives import serialization
from cyphonic.pki import generate_key, make_csr

BIN = Path(sys.executable).parent
ADMIN_TOKEN = secrets.token_urlsafe(24)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _admin_sql(postgres: str, statement: str) -> None:
    conn = await asyncpg.connect(postgres, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _run(url: str, args: argparse.Namespace) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        names = [f"bench-{i:05d}" for i in range(args.count)]
        sem = asyncio.Semaphore(args.concurrency)

        async def prepare(name: str) -> tuple[str, str]:
            async with sem:
                created = await client.post("/v1/nodes", json={"name": name}, headers=headers)
                created.raise_for_status()
                token = await client.post(
                    f"/v1/nodes/{name}/enrolment-tokens", json={}, headers=headers
                )
                token.raise_for_status()
            csr = make_csr(generate_key(), f"{name}.cyphonic.internal")
            return token.json()["token"], csr.public_bytes(serialization.Encoding.PEM).decode()

        prepared = await asyncio.gather(*(prepare(n) for n in names))
        latencies: list[float] = []
        failures = 0

        async def enrol(token: str, csr: str) -> None:
            nonlocal failures
            async with sem:
                start = time.perf_counter()
                response = await client.post("/v1/enrol", json={"token": token, "csr_pem": csr})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 201:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(enrol(t, c) for t, c in prepared))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "enrolments": float(len(latencies)),
        "failures": float(failures),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "CYPHONIC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        database = f"cyphonic_bench_{secrets.token_hex(4)}"
        if args.sqlite:
            url = f"sqlite+aiosqlite:///{work / 'bench.db'}"
        else:
            asyncio.run(_admin_sql(args.postgres, f'CREATE DATABASE "{database}"'))
            url = (
                args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
                + f"/{database}"
            )
        token_file = work / "admin-token"
        token_file.write_text(ADMIN_TOKEN)
        token_file.chmod(0o600)
        subprocess.run(
            [BIN / "cyphonic-as", "init-pki", "--pki-dir", str(work / "pki")],
            check=True,
            capture_output=True,
        )
        port = _free_port(socket.SOCK_STREAM)
        env = {
            **os.environ,
            "CYPHONIC_DATABASE_URL": url,
            "CYPHONIC_PKI_DIR": str(work / "pki"),
            "CYPHONIC_LOG_LEVEL": "warning",
        }
        proc = subprocess.Popen(
            [
                BIN / "cyphonic-as",
                "serve",
                "--migrate",
                "--no-quic",
                "--http-port",
                str(port),
                "--admin-token-file",
                str(token_file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("cyphonic-as did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            result = asyncio.run(_run(base, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            if not args.sqlite:
                asyncio.run(
                    _admin_sql(args.postgres, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                )
    backend = "sqlite" if args.sqlite else "postgres"
    print(
        f"as_enrolment backend={backend} count={args.count} concurrency={args.concurrency}"
        f" failures={int(result['failures'])}"
    )
    print(
        f"  {result['per_second']:.1f} enrolments/s  ({result['seconds']:.2f} s)"
        f"  p50 {result['p50_ms']:.1f} ms  p95 {result['p95_ms']:.1f} ms"
        f"  max {result['max_ms']:.1f} ms"
    )
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

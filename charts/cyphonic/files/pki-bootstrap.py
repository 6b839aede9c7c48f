"""Create the CYPHONIC PKI Secrets that are missing (run by the chart's pki hook Job).

Existing Secrets are read back into a PKI directory, `cyphonic-as init-pki` completes what is
missing (it keeps every file it finds), and only the missing Secrets are created. Nothing is
ever overwritten, so the CA survives upgrades; the Secrets carry no Helm ownership, so it
survives `helm uninstall` too. Talks to the API server with the pod's service account token
(standard library only). Private keys are never printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API = "https://kubernetes.default.svc"
TRUST = ["root-ca.crt", "node-ca.crt", "service-ca.crt"]
# What each Secret holds; the "ca" Secret is mounted by no pod (keep it, or move it offline).
LAYOUT = {
    "ca": ["root-ca.crt", "root-ca.key", "service-ca.crt", "service-ca.key"],
    "as": [*TRUST, "node-ca.key", "as.crt", "as.key"],
    "nms": [*TRUST, "nms.crt", "nms.key"],
    "trs": [*TRUST, "trs.crt", "trs.key"],
}


class Api:
    """The few Secret calls this needs."""

    def __init__(self) -> None:
        self.namespace = (SA_DIR / "namespace").read_text().strip()
        self._token = (SA_DIR / "token").read_text().strip()
        self._tls = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))

    def _call(self, method: str, path: str, body: dict[str, object] | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{API}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        with urllib.request.urlopen(request, context=self._tls, timeout=30) as response:
            return json.loads(response.read())

    def get_secret(self, name: str) -> dict[str, str] | None:
        """The decoded data of a Secret, or None if it does not exist."""
        try:
            found = self._call("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()}

    def create_secret(self, name: str, files: dict[str, bytes], labels: dict[str, str]) -> None:
        """Create an Opaque Secret from file contents."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "labels": labels},
            "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
        }
        self._call("POST", f"/api/v1/namespaces/{self.namespace}/secrets", body)


# A CA whose key lives in one Secret and whose certificate is copied into others: if the
# Secret with the key is lost while the copies remain, a new CA would leave them stale.
CA_KEYS = {"ca": ["root-ca.crt", "service-ca.crt"], "as": ["node-ca.crt"]}


def _inconsistent(prefix: str, existing: dict[str, dict[str, str] | None]) -> str | None:
    """Why the existing Secrets cannot be completed safely, or None.

    Refused: a lost Secret that held a CA key while other Secrets still carry that CA's
    certificate (a new CA would leave the NMS/TRS trusting the old one), and Secrets that
    already disagree about a CA certificate. Nothing is created then; the message says
    what the operator can do.
    """
    for part, certs in CA_KEYS.items():
        if existing[part] is not None:
            continue
        holders = sorted(
            f"{prefix}-{other}"
            for other, data in existing.items()
            if data is not None and any(name in data for name in certs)
        )
        if holders:
            return (
                f"Secret {prefix}-{part} (the key of {', '.join(certs)}) is missing while "
                f"{', '.join(holders)} still hold the old certificate; a new CA would leave "
                f"them stale. Restore {prefix}-{part} from a backup, or delete "
                f"{', '.join(holders)} as well so that everything is issued anew under a new "
                f"CA (every node then enrols again)."
            )
    for name in TRUST:
        seen = {
            f"{prefix}-{part}": data[name]
            for part, data in existing.items()
            if data is not None and name in data
        }
        if len(set(seen.values())) > 1:
            return (
                f"Secrets {', '.join(sorted(seen))} hold different {name}; delete the stale "
                f"ones (their holders are issued anew) or restore them from a backup."
            )
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefix", required=True, help="Secret name prefix")
    parser.add_argument("--domain", required=True, help="overlay DNS domain")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/pki"))
    parser.add_argument("--label", action="append", default=[], help="key=value")
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)

    api = Api()
    existing = {part: api.get_secret(f"{args.prefix}-{part}") for part in LAYOUT}
    missing = [part for part, data in existing.items() if data is None]
    if not missing:
        print(f"pki: all Secrets {args.prefix}-{{{','.join(LAYOUT)}}} exist, kept")
        return 0

    problem = _inconsistent(args.prefix, existing)
    if problem:
        print(f"pki: {problem}", file=sys.stderr)
        return 1

    work = args.work_dir
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    for data in existing.values():
        for name, content in (data or {}).items():
            path = work / name
            path.write_text(content)
            path.chmod(0o600)
    subprocess.run(
        ["cyphonic-as", "init-pki", "--pki-dir", str(work), "--domain", args.domain], check=True
    )
    for part in missing:
        files = {n: (work / n).read_bytes() for n in LAYOUT[part] if (work / n).exists()}
        absent = sorted(set(LAYOUT[part]) - set(files))
        if part != "ca" and absent:
            print(f"pki: cannot build {args.prefix}-{part}: missing {absent}", file=sys.stderr)
            return 1
        api.create_secret(f"{args.prefix}-{part}", files, labels)
        print(f"pki: created Secret {args.prefix}-{part} ({', '.join(sorted(files))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

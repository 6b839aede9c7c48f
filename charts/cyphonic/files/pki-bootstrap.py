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

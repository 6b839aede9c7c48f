"""Container HEALTHCHECK: exit 0 when the service's /readyz answers 200.

The admin REST port comes from CYPHONIC_HTTP_PORT (set per image); the check runs inside
the container, so it asks the loopback address whatever CYPHONIC_HTTP_HOST binds.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("CYPHONIC_HTTP_PORT", "8080")
path = sys.argv[1] if len(sys.argv) > 1 else "/readyz"
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"{path}: {exc}", file=sys.stderr)
    sys.exit(1)

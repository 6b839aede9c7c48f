#!/usr/bin/env bash
# Regenerates the committed Python code for proto/ with the pinned generator
# (grpcio-tools and mypy-protobuf versions are pinned in the workspace lock).
# Usage: proto/generate.sh [OUT_DIR]   (default: lib/src)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-lib/src}"
mkdir -p "$out/cyphonic/v1"
python -m grpc_tools.protoc -I proto \
  --python_out="$out" --mypy_out="$out" \
  proto/cyphonic/v1/*.proto
[ -f "$out/cyphonic/v1/__init__.py" ] || echo '"""Generated protobuf code for cyphonic.v1 (do not edit; make proto)."""' > "$out/cyphonic/v1/__init__.py"

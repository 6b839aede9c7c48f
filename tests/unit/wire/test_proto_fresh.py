"""The committed generated protobuf code matches proto/ (fails when someone forgot
``make proto`` after editing a .proto, or edited the generated files by hand)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "lib" / "src" / "cyphonic" / "v1"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run proto/generate.sh")
    # the generator runs `python -m grpc_tools.protoc`: use this interpreter's environment
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(ROOT / "proto" / "generate.sh"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"proto/generate.sh failed:\n{result.stderr}"
    fresh = _files(tmp_path / "cyphonic" / "v1")
    committed = _files(COMMITTED)
    assert {"signalling_pb2.py", "signalling_pb2.pyi"} <= set(fresh)
    assert set(fresh) == set(committed), "generated and committed file sets differ"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files (run `make proto`): {stale}"

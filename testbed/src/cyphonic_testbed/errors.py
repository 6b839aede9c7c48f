"""Errors of the test bed.

    TestbedError
    +-- TopologyError        the description is inconsistent (caught before anything is built)
    +-- PreflightError       the machine cannot host a bed (not root, ``ip``/``nft`` missing)
    +-- CommandError         a command (``ip``, ``nft``, ``sysctl``, a probe) failed
    +-- TestbedTimeout       a bounded wait ran out (also a ``TimeoutError``)

The package depends on nothing beyond the standard library, so it keeps its own small tree
instead of ``cyphonic.errors`` (whose codes are for the wire).
"""

from __future__ import annotations

from collections.abc import Sequence


class TestbedError(Exception):
    """Base of every test-bed error."""

    __test__ = False  # not a pytest test class


class TopologyError(TestbedError, ValueError):
    """The topology description is inconsistent."""


class PreflightError(TestbedError):
    """The machine lacks something a bed needs (root, iproute2, nftables, ...)."""


class CommandError(TestbedError):
    """A command run for the bed failed; carries its argv, exit status and output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip()[-2000:]
        # Inline scripts (python -c ...) would drown the message: show their start only.
        shown = " ".join(a if len(a) <= 80 else a[:60].replace("\n", " ") + "..." for a in argv)
        super().__init__(f"command {shown!r} exited {returncode}: {detail}")


class TestbedTimeout(TestbedError, TimeoutError):
    """A bounded wait ran out."""

"""What the probes, captures and helper services need of a bed's node (Protocols).

``cyphonic_testbed.bed.Node`` satisfies ``Host``; the helper modules depend on this small
interface rather than on ``bed`` itself, so that ``bed`` can offer them as methods
(``node.ping()``, ``node.capture()``) without an import cycle.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol


class Workspace(Protocol):
    """The bed a node belongs to, as far as helpers use it: where to put files."""

    @property
    def workdir(self) -> Path: ...


class Host(Protocol):
    """A namespace of a bed that helpers run programs in."""

    @property
    def name(self) -> str: ...

    @property
    def bed(self) -> Workspace: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = ...,
        check: bool = ...,
        input: str | bytes | None = ...,
        text: bool = ...,
        env: Mapping[str, str] | None = ...,
        cwd: str | os.PathLike[str] | None = ...,
    ) -> subprocess.CompletedProcess[Any]: ...

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]: ...

    def addresses(self, family: Literal[4, 6]) -> list[str]: ...

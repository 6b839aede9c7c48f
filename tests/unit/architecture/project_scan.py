"""The project's modules and what each imports, read from source (nothing is imported).

Shared by the architecture tests: the import-cycle test and the declared-dependency test.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# Each workspace member: its directory and the source root of its package(s).
MEMBERS = (
    "lib",
    "services/auth",
    "services/nms",
    "services/trs",
    "node-agent",
    "testbed",
    "tests/support",
)
GENERATED = ("cyphonic.v1",)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    member: str


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    # Under ``if TYPE_CHECKING:``: needed by the type checker only, never at run time.
    typing_only: bool


def member_modules(member: str) -> list[Module]:
    src = ROOT / member / "src"
    found = []
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name.startswith(GENERATED) or "migrations" in parts:
            continue
        found.append(Module(name=name, path=path, member=member))
    return found


def all_modules() -> list[Module]:
    return [m for member in MEMBERS for m in member_modules(member)]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: Module, known: frozenset[str] = frozenset()) -> list[Import]:
    """Every import statement in the module (top level, in functions, under TYPE_CHECKING).

    ``from pkg import sub`` counts as an import of ``pkg.sub`` when that is one of the
    ``known`` modules, else of ``pkg`` (a package's own ``__init__`` is not a dependency
    of its submodules' importers in the design sense, only by Python's loading order).
    """
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    typing_only.add(id(sub))
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            subs = [f"{base}.{alias.name}" for alias in node.names]
            names = [sub if sub in known else base for sub in subs]
        for name in names:
            found.append(Import(target=name, line=node.lineno, typing_only=id(node) in typing_only))
    return found


def declared_dependencies(member: str) -> set[str]:
    """Distribution names a member declares (optional extras included), normalised."""
    data = tomllib.loads((ROOT / member / "pyproject.toml").read_text())
    project = data["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    names = set()
    for spec in specs:
        name = spec
        for sep in "[<>=!~; ":
            name = name.split(sep)[0]
        names.add(normalise(name))
    return names


def normalise(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def distribution_of_member(member: str) -> str:
    data = tomllib.loads((ROOT / member / "pyproject.toml").read_text())
    return normalise(data["project"]["name"])

"""Every third-party or workspace package a member imports is declared in that member's
pyproject.toml (``dependencies`` or an optional extra), so that a member installed alone,
as its container image is, can import every one of its modules.

Imports are read from source (top level, in functions, and under TYPE_CHECKING); the
distribution that provides an import name comes from the installed environment's metadata.
"""

from __future__ import annotations

import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from project_scan import (
    MEMBERS,
    Module,
    declared_dependencies,
    distribution_of_member,
    imports_of,
    member_modules,
    normalise,
)

# Workspace members are installed editable, which packages_distributions() does not list.
WORKSPACE_PACKAGES = {
    "cyphonic": "cyphonic",
    "cyphonic_auth": "cyphonic-auth",
    "cyphonic_nms": "cyphonic-nms",
    "cyphonic_trs": "cyphonic-trs",
    "cyphonic_agent": "cyphonic-agent",
    "cyphonic_testbed": "cyphonic-testbed",
    "cyphonic_testing": "cyphonic-testing",
}


def undeclared(member: str) -> list[str]:
    declared = declared_dependencies(member) | {distribution_of_member(member)}
    return undeclared_in(member_modules(member), declared, where=member)


def undeclared_in(modules: list[Module], declared: set[str], *, where: str) -> list[str]:
    providers = packages_distributions()
    problems = []
    for module in modules:
        for imp in imports_of(module):
            top = imp.target.split(".")[0]
            if not top or top == "__future__" or top in sys.stdlib_module_names:
                continue
            if top in WORKSPACE_PACKAGES:
                dists = {WORKSPACE_PACKAGES[top]}
            else:
                dists = {normalise(d) for d in providers.get(top, [])}
            if not dists:
                problems.append(f"{module.name}:{imp.line} imports {top}, which nothing provides")
            elif not dists & declared:
                problems.append(
                    f"{module.name}:{imp.line} imports {top} ({' or '.join(sorted(dists))}), "
                    f"not declared in {where}/pyproject.toml"
                )
    return problems


@pytest.mark.parametrize("member", MEMBERS)
def test_member_declares_what_it_imports(member: str) -> None:
    problems = undeclared(member)
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("import os\nimport json\n\ndef f():\n    import pydantic_settings\n")
    module = Module(name="probe", path=source, member="x")
    assert undeclared_in([module], {"pydantic-settings"}, where="x") == []
    [problem] = undeclared_in([module], {"pydantic"}, where="x")
    assert "probe:5 imports pydantic_settings (pydantic-settings)" in problem

"""Settings the review hardened: the environment name is checked, secrets never printed."""

from __future__ import annotations

import pytest
from cyphonic.config import ServiceSettings
from cyphonic_nms import cli
from cyphonic_nms.config import NmsSettings
from pydantic import ValidationError


@pytest.mark.parametrize("name", ["prod", "Production", "staging", ""])
def test_unknown_environment_is_refused(name: str) -> None:
    # "prod" used to pass as a free string and skip every production check.
    with pytest.raises(ValidationError, match="environment"):
        ServiceSettings(environment=name)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="environment"):
        NmsSettings(environment=name)  # type: ignore[arg-type]


def test_production_still_applies_its_checks() -> None:
    with pytest.raises(ValidationError, match="admin token"):
        NmsSettings(environment="production")
    ok = NmsSettings(
        environment="production",
        admin_token="x" * 30,
        database_url="postgresql+asyncpg://db/cyphonic",
    )
    assert ok.environment == "production"


def test_cli_exits_2_on_a_misspelt_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CYPHONIC_ENVIRONMENT", "prod")
    assert cli.main(["settings"]) == 2
    assert "environment" in capsys.readouterr().err

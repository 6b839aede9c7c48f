"""Bad settings are reported by field, never with the values given (issue 15 item 6).

Each command gets a database or Redis URL with a password together with a setting that
fails validation, in the environment and on the command line, and must print the problem
without the password.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from cyphonic.service import describe_settings_error, print_settings_error
from cyphonic_agent.cli import main as agent_main
from cyphonic_auth.cli import main as as_main
from cyphonic_nms.cli import main as nms_main
from cyphonic_trs.cli import main as trs_main
from pydantic import BaseModel, ValidationError

# Short, so that pydantic's own message would not elide the password from the middle.
SECRET = "Hunter2pw"
DB_URL = f"postgresql://u:{SECRET}@db/c"
REDIS_URL = f"redis://:{SECRET}@r/0"

Main = Callable[[Sequence[str] | None], int]
SERVICES: list[tuple[str, Main, list[str]]] = [
    ("cyphonic-as", as_main, ["serve"]),
    ("cyphonic-nms", nms_main, ["serve"]),
    ("cyphonic-trs", trs_main, ["serve"]),
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CYPHONIC_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(("prog", "main", "argv"), SERVICES, ids=[s[0] for s in SERVICES])
def test_a_bad_field_with_a_password_url_elsewhere(
    prog: str,
    main: Main,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # production refuses the missing admin token; the model-level error used to carry every
    # input, the URLs with their passwords among them.
    monkeypatch.setenv("CYPHONIC_ENVIRONMENT", "production")
    monkeypatch.setenv("CYPHONIC_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CYPHONIC_REDIS_URL", REDIS_URL)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{prog}: bad settings:" in err
    assert "admin token" in err
    assert SECRET not in err


@pytest.mark.parametrize(("prog", "main", "argv"), SERVICES, ids=[s[0] for s in SERVICES])
def test_a_password_url_in_a_field_that_refuses_it(
    prog: str,
    main: Main,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A URL pasted into the wrong (numeric) setting: the error names the field only.
    monkeypatch.setenv("CYPHONIC_QUIC_PORT", DB_URL)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{prog}: bad settings:" in err
    assert "quic_port" in err
    assert SECRET not in err


def test_the_agent_hides_a_value_it_refuses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CYPHONIC_QUIC_PORT", REDIS_URL)
    assert agent_main(["up"]) != 0
    err = capsys.readouterr().err
    assert "bad agent settings" in err
    assert SECRET not in err


class _Url(BaseModel):
    port: int


def test_describe_names_fields_and_scrubs_credentials() -> None:
    with pytest.raises(ValidationError) as caught:
        _Url(port=DB_URL)  # type: ignore[arg-type]
    text = describe_settings_error(caught.value)
    assert text.startswith("port: ")
    assert SECRET not in text
    # A message that quotes a URL itself (a TOML error, a validator) loses the credentials.
    scrubbed = describe_settings_error(ValueError(f"cannot use {DB_URL} or {REDIS_URL}"))
    assert SECRET not in scrubbed
    assert "postgresql://***@db/c" in scrubbed
    assert "redis://***@r/0" in scrubbed


def test_print_settings_error_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert print_settings_error("prog", ValueError("nope")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "prog: bad settings: nope\n"

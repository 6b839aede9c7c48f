"""Fixtures of the console test: the three services (on the run's own Redis database), and a
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by
scripts/setup.sh) driven by selenium with a fresh profile."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from console_services import ADMIN_TOKEN, Services
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

CHROMIUM = Path(os.environ.get("CYPHONIC_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CYPHONIC_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))


@pytest.fixture
def services(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Services]:
    """AS, TRS and NMS processes (console_services.py); each must exit 0 on SIGTERM."""
    world = Services(tmp=tmp_path, token=ADMIN_TOKEN, pki=tmp_path / "pki")
    try:
        world.start(database_url=pg_url, redis_url=redis_url)
        yield world
        for name, status in world.stop():
            assert status == 0, f"cyphonic-{name} exited {status}"
    finally:
        world.stop()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile, no background traffic."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed (scripts/setup.sh installs them)"
        if os.environ.get("CYPHONIC_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    # Both paths are given, so selenium's driver manager never runs (nor fetches anything);
    # should it, it sends no usage statistics.
    os.environ.setdefault("SE_AVOID_STATS", "true")
    with tempfile.TemporaryDirectory(prefix="cyphonic-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",  # containers' small /dev/shm
            "--window-size=1360,1000",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors
        driver = webdriver.Chrome(options=options, service=DriverService(str(CHROMEDRIVER)))
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()

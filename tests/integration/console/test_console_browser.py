"""The web console in a real headless Chromium against real services.

``cyphonic-as``, ``cyphonic-trs`` and ``cyphonic-nms`` run as processes (PostgreSQL, Redis);
four nodes enrol at the AS over REST and register with the NMS over mutual-TLS QUIC:
alice and bob report private addresses the NMS does not see (behind NAT), carol reports
the address the NMS sees (public), dave is on IPv6 only. alice and bob open a relayed
tunnel through the TRS and exchange datagrams; carol asks for alice (pattern 2), dave for
carol (relayed: no family in common); then alice
moves to another LAN (re-registers with a new address).

The browser, as an operator: is refused with a wrong token, signs in with the right one,
finds every node online with its addresses and NAT kind, alice's last handover, the
relayed pair with its reason and TRS, the TRS replica and the pair's session; backs out of
a revoke, then revokes bob by typing his name, and sees him revoked and offline while the
NMS and the TRS have closed his connections. The token never appears in a URL or in a service's log.

Set ``CYPHONIC_CONSOLE_SCREENSHOT=docs/console.png`` to write the screenshot in the docs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from console_nodes import ConsoleNode, enrolled_node, has_ipv6_loopback, relayed_pair
from console_services import ADMIN_TOKEN, DOMAIN, Services
from cyphonic.v1 import signalling_pb2 as pb
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(600)]

T = TypeVar("T")
WAIT_S = 20.0


async def in_browser(call: Callable[[], T]) -> T:
    """Run a blocking selenium step off the event loop (the nodes' QUIC lives on it)."""
    return await asyncio.to_thread(call)


def wait(driver: WebDriver, check: Callable[[WebDriver], Any], within_s: float = WAIT_S) -> Any:
    return WebDriverWait(
        driver, within_s, ignored_exceptions=(StaleElementReferenceException,)
    ).until(check)


def row(driver: WebDriver, table: str, attr: str, value: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'#{table} tbody tr[data-{attr}="{value}"]')


def cell(driver: WebDriver, table: str, attr: str, value: str, css: str) -> str:
    return str(row(driver, table, attr, value).find_element(By.CSS_SELECTOR, css).text)


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element(By.ID, element_id).is_displayed())


def session_token(driver: WebDriver) -> Any:
    return driver.execute_script("return sessionStorage.getItem('cyphonic.console.token')")


def sign_in(driver: WebDriver, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()


async def test_console_lists_nodes_shows_the_relayed_pair_and_revokes(
    services: Services, browser: WebDriver
) -> None:
    assert services.nms is not None and services.auth is not None
    nodes: list[ConsoleNode] = []
    try:
        alice = await enrolled_node(services, "alice", report="192.168.77.10")
        bob = await enrolled_node(services, "bob", report="192.168.77.11")
        carol = await enrolled_node(services, "carol")
        nodes += [alice, bob, carol]
        ipv6 = has_ipv6_loopback()
        if ipv6:
            dave = await enrolled_node(services, "dave", bind="::1")
            nodes.append(dave)
        relayed = await relayed_pair(alice, bob)
        assert (await carol.route_to(alice)).pattern == pb.ROUTE_PATTERN_NAT_CONNECTS
        if ipv6:
            assert (await dave.route_to(carol)).pattern == pb.ROUTE_PATTERN_RELAY
        await alice.register(report="192.168.88.20")  # alice moved to another LAN
        await _operator_session(services, browser, relayed, [n.fqdn for n in nodes], bob)
    finally:
        for node in nodes:
            await node.close()
    nms_log = services.nms.log.read_text()
    for service in services.started:  # the token reached the AS and TRS only as a header
        assert ADMIN_TOKEN not in service.log.read_text(), service.name
    assert '"console_revoke"' in nms_log and "bob.cyphonic.internal" in nms_log


async def _operator_session(
    services: Services, driver: WebDriver, relayed: str, fqdns: list[str], bob: ConsoleNode
) -> None:
    assert services.nms is not None and services.auth is not None
    # The admin port's root leads to the console; a wrong token: a clear message, nothing kept.
    await in_browser(lambda: driver.get(f"{services.nms.url}/"))
    await in_browser(lambda: wait(driver, lambda d: visible(d, "login")))
    assert await in_browser(lambda: driver.current_url) == f"{services.nms.url}/console/"
    await in_browser(lambda: sign_in(driver, "not-the-admin-token"))
    message = await in_browser(
        lambda: wait(
            driver,
            lambda d: visible(d, "login-error") and d.find_element(By.ID, "login-error").text,
        )
    )
    assert "not accepted" in message
    assert await in_browser(lambda: session_token(driver)) is None
    assert not await in_browser(lambda: visible(driver, "app"))

    # The right one: every node, online, with its addresses and network.
    await in_browser(lambda: sign_in(driver, ADMIN_TOKEN))
    await in_browser(
        lambda: wait(
            driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")) == len(fqdns)
        )
    )
    assert await in_browser(lambda: session_token(driver)) == ADMIN_TOKEN
    assert ADMIN_TOKEN not in await in_browser(lambda: driver.current_url)
    for fqdn in fqdns:
        node = await in_browser(lambda fqdn=fqdn: row(driver, "nodes", "fqdn", fqdn))
        assert await in_browser(lambda node=node: node.get_attribute("data-online")) == "true"
    assert (
        await in_browser(lambda: cell(driver, "nodes", "fqdn", f"alice.{DOMAIN}", ".network"))
        == "IPv4 behind NAT"
    )
    assert (
        await in_browser(lambda: cell(driver, "nodes", "fqdn", f"carol.{DOMAIN}", ".network"))
        == "public IPv4"
    )
    virtual = await in_browser(lambda: cell(driver, "nodes", "fqdn", f"alice.{DOMAIN}", ".virtual"))
    assert virtual.startswith("100.64.")
    real = await in_browser(lambda: cell(driver, "nodes", "fqdn", f"alice.{DOMAIN}", ".real"))
    assert "127.0.0.1:" in real and "reports 192.168.88.20:" in real
    moved = await in_browser(lambda: cell(driver, "nodes", "fqdn", f"alice.{DOMAIN}", ".handover"))
    assert "192.168.77.10:" in moved and "192.168.88.20:" in moved
    assert (
        await in_browser(lambda: cell(driver, "nodes", "fqdn", f"bob.{DOMAIN}", ".handover")) == "-"
    )
    if len(fqdns) == 4:
        assert (
            await in_browser(lambda: cell(driver, "nodes", "fqdn", f"dave.{DOMAIN}", ".network"))
            == "IPv6"
        )

    # The relayed pair: pattern, transport, reason, TRS; the TRS replica and the session.
    assert (
        await in_browser(lambda: cell(driver, "routes", "route-id", relayed, ".pattern"))
        == "3 relay"
    )
    assert (
        await in_browser(lambda: cell(driver, "routes", "route-id", relayed, ".transport"))
        == "QUIC/UDP via TRS"
    )
    reason = await in_browser(lambda: cell(driver, "routes", "route-id", relayed, ".reason"))
    # (These nodes answer no reachability probes: their NAT mapping is not known, so no
    # hole punching; the words say so.)
    assert reason == (
        "both nodes are behind IPv4 NAT (alice: NAT mapping not known; bob: NAT mapping not"
        " known) and share no IPv6: relayed through the TRS"
    ), reason
    trs = await in_browser(lambda: cell(driver, "routes", "route-id", relayed, ".trs"))
    assert trs.startswith("trs-0\nrelaying, ")  # its session at the TRS, both sides in
    pair = await in_browser(lambda: cell(driver, "routes", "route-id", relayed, ".pair"))
    assert pair.startswith("alice → bob")
    patterns = await in_browser(
        lambda: sorted(
            e.get_attribute("data-pattern")
            for e in driver.find_elements(By.CSS_SELECTOR, "#routes tbody tr")
        )
    )
    assert patterns == (["2", "3", "3"] if len(fqdns) == 4 else ["2", "3"])
    status = await in_browser(lambda: cell(driver, "trs-replicas", "replica", "trs-0", ".status"))
    assert status.startswith("live")
    session = await in_browser(lambda: row(driver, "trs-sessions", "route-id", relayed).text)
    assert "alice ↔ bob" in session and "yes" in session
    assert (
        await in_browser(
            lambda: driver.find_element(By.ID, "policy-section").get_attribute("data-available")
        )
        == "false"
    )

    shot = os.environ.get("CYPHONIC_CONSOLE_SCREENSHOT")
    if shot:
        await in_browser(lambda: _screenshot(driver, Path(shot)))

    # Revoke: backing out changes nothing; the name must be typed.
    bob_row_button = f'#nodes tbody tr[data-fqdn="{bob.fqdn}"] button.revoke'
    await in_browser(lambda: driver.find_element(By.CSS_SELECTOR, bob_row_button).click())
    await in_browser(lambda: wait(driver, lambda d: visible(d, "revoke-dialog")))
    assert await in_browser(lambda: driver.find_element(By.ID, "revoke-fqdn").text) == bob.fqdn
    assert not await in_browser(lambda: driver.find_element(By.ID, "revoke-submit").is_enabled())
    await in_browser(lambda: driver.find_element(By.ID, "revoke-confirm").send_keys("bo"))
    assert not await in_browser(lambda: driver.find_element(By.ID, "revoke-submit").is_enabled())
    await in_browser(lambda: driver.find_element(By.ID, "revoke-cancel").click())
    await in_browser(lambda: wait(driver, lambda d: not visible(d, "revoke-dialog")))
    async with httpx.AsyncClient(base_url=services.auth.url, headers=services.admin) as http:
        assert (await http.get("/v1/nodes/bob")).json()["state"] == "active"

    await in_browser(lambda: driver.find_element(By.CSS_SELECTOR, bob_row_button).click())
    await in_browser(lambda: wait(driver, lambda d: visible(d, "revoke-dialog")))
    await in_browser(lambda: driver.find_element(By.ID, "revoke-confirm").send_keys("bob"))
    await in_browser(lambda: driver.find_element(By.ID, "revoke-submit").click())
    notice = await in_browser(
        lambda: wait(
            driver, lambda d: visible(d, "notice") and d.find_element(By.ID, "notice").text
        )
    )
    assert notice.startswith(f"{bob.fqdn} is revoked")
    # The NMS drops bob (its revocation poll) and the console shows him revoked, offline.
    assert bob.nms is not None
    await asyncio.wait_for(bob.nms.wait_closed(), 10)
    await in_browser(
        lambda: wait(
            driver,
            lambda d: (
                row(d, "nodes", "fqdn", bob.fqdn).get_attribute("data-state") == "revoked"
                and row(d, "nodes", "fqdn", bob.fqdn).get_attribute("data-online") == "false"
            ),
        )
    )
    assert not await in_browser(
        lambda: driver.find_element(By.CSS_SELECTOR, bob_row_button).is_enabled()
    )
    # The TRS closes bob's control connection too (its CRL refresh from the AS).
    assert services.trs is not None
    trs_log = services.trs.log

    def trs_dropped_bob() -> bool:
        return any(
            "connection_closed_revoked" in line and bob.fqdn in line
            for line in trs_log.read_text().splitlines()
        )

    for _ in range(75):  # 15 s
        if trs_dropped_bob():
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the TRS did not close bob's connection after the revocation")
    alice_row = await in_browser(lambda: row(driver, "nodes", "fqdn", f"alice.{DOMAIN}"))
    assert await in_browser(lambda: alice_row.get_attribute("data-online")) == "true"
    async with httpx.AsyncClient(base_url=services.auth.url) as http:
        revocations = (await http.get("/v1/revocations")).json()["items"]
    assert {(r["fqdn"], r["reason"]) for r in revocations} >= {
        (bob.fqdn, "revoked from the console")
    }

    # The node filter: "online only" hides bob now; words match any text of a row.
    def shown() -> list[str]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
        return sorted(str(r.get_attribute("data-fqdn")) for r in rows if r.is_displayed())

    await in_browser(lambda: driver.find_element(By.ID, "online-only").click())
    assert bob.fqdn not in await in_browser(shown)
    assert f"alice.{DOMAIN}" in await in_browser(shown)
    await in_browser(lambda: driver.find_element(By.ID, "node-filter").send_keys("behind nat"))
    assert await in_browser(shown) == [f"alice.{DOMAIN}"]
    await in_browser(lambda: driver.find_element(By.ID, "online-only").click())
    assert await in_browser(shown) == [f"alice.{DOMAIN}", bob.fqdn]

    # Signing out forgets the token.
    await in_browser(lambda: driver.find_element(By.ID, "sign-out").click())
    await in_browser(lambda: wait(driver, lambda d: visible(d, "login")))
    assert await in_browser(lambda: session_token(driver)) is None

    # No script error and no Content-Security-Policy violation on the way; the one
    # failed request is the wrong token's 401.
    errors = [
        entry["message"]
        for entry in await in_browser(lambda: driver.get_log("browser"))
        if entry["level"] == "SEVERE"
    ]
    assert [e for e in errors if "status of 401" not in e] == [], errors
    assert len(errors) == 1, errors


def _screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page as PNG (the window grown to the page's height)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1360, min(max(height + 160, 700), 2400))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(1360, 1000)

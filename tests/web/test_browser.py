"""The web admin in a real headless Chromium (Debian's, driven by Selenium).

Screenshots of each page land in ``build/screenshots/`` for a developer to look at.
The names with markup in them (``conftest.py``) would raise an alert if any page ran
them, and Selenium fails the next command when an alert is open.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.web.conftest import ADMIN, VIEWER, Site

pytestmark = pytest.mark.timeout(300)

SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
# Generous: a busy machine with five engineers' tests; a live update takes ~0.5 s idle.
WAIT_S = 30


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver (scripts/setup.sh)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--disable-extensions", "--no-first-run"]:
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(WAIT_S)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield browser
    finally:
        browser.quit()


def _until(browser: WebDriver, what: str, condition) -> None:  # type: ignore[no-untyped-def]
    # An element read while the page is being replaced (a form's redirect) is stale or
    # missing for a moment: asked again at the next poll.
    WebDriverWait(browser, WAIT_S, poll_frequency=0.1,
                  ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                  ).until(lambda _: condition(), message=f"waiting for {what}")


def _log_in(browser: WebDriver, url: str, login: str, password: str) -> None:
    browser.delete_all_cookies()
    browser.get(url + "login")
    browser.find_element(By.ID, "login").send_keys(login)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "submit").click()
    _until(browser, "the dashboard", lambda: browser.find_elements(By.ID, "by-state"))


def _cell(browser: WebDriver, vm_id: int, cls: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, f'tr[data-vm="{vm_id}"] .{cls}').text)


def _same_page(browser: WebDriver) -> bool:
    """Whether the page is the one marked by ``_mark``: a reload would have lost the mark."""
    return bool(browser.execute_script("return window.qvdTestMark === 'kept'"))


def _mark(browser: WebDriver) -> None:
    browser.execute_script("window.qvdTestMark = 'kept'")


def _press(browser: WebDriver, vm_ids: list[int], button: str) -> None:
    for box in browser.find_elements(By.CSS_SELECTOR, 'input[name="id"]'):
        if box.is_selected() != (int((box.get_attribute("value") or "0").partition(":")[0])
                                 in vm_ids):
            box.click()
    browser.find_element(By.ID, button).click()


def test_an_admin_runs_a_vm_and_a_host_from_the_browser(site: Site, browser: WebDriver) -> None:
    browser.get(site.url)
    assert browser.current_url.endswith("/login")
    browser.save_screenshot(str(SCREENSHOTS / "login.png"))
    _log_in(browser, site.url, *ADMIN)
    count = browser.find_element(By.CSS_SELECTOR, '[data-count="VMs"]').text
    assert count == "3"
    browser.save_screenshot(str(SCREENSHOTS / "dashboard.png"))

    # Start v1 from the VMs page: the page stays, the feed turns its row running.
    browser.get(site.url + "vms")
    _until(browser, "the live feed", lambda: "on" in browser.find_element(By.ID, "live").text)
    _mark(browser)
    assert _cell(browser, 1, "state") == "stopped"
    _press(browser, [1], "vm-start")
    _until(browser, "v1 running", lambda: _cell(browser, 1, "state") == "running")
    _until(browser, "the start's result", lambda: "vm start v1: done"
           in browser.find_element(By.ID, "results").text)
    assert _cell(browser, 1, "host") != "-"
    assert _same_page(browser)
    browser.save_screenshot(str(SCREENSHOTS / "vms.png"))

    # A change made elsewhere (the CLI) shows on the open page without a reload.
    site.cli.run("vm", "start", "-f", "name=v2")
    _until(browser, "v2 running (CLI)", lambda: _cell(browser, 2, "state") == "running")
    site.cli.run("vm", "block", "-f", "name=v2")
    _until(browser, "v2 blocked (CLI)", lambda: _cell(browser, 2, "blocked") == "yes")
    site.cli.run("vm", "stop", "-f", "name=v2")
    site.cli.run("vm", "unblock", "-f", "name=v2")
    _until(browser, "v2 stopped (CLI)", lambda: _cell(browser, 2, "state") == "stopped"
           and _cell(browser, 2, "blocked") == "no")
    assert _same_page(browser)

    # A VM added elsewhere is announced; deleted from here, its row is struck through.
    site.cli.run("vm", "add", "name=v4", "user=u", "osf=o")
    _until(browser, "the added hint", lambda: browser.find_element(By.ID, "added").text
           == "1 VM(s) added: reload to see them")
    browser.refresh()
    _press(browser, [4], "vm-delete")
    browser.switch_to.alert.accept()  # "Delete the selected VMs?"
    _until(browser, "v4 deleted", lambda: _cell(browser, 4, "state") == "deleted")
    assert "no vm matches" in site.cli.fails("vm", "list", "-f", "name=v4")

    browser.find_element(By.LINK_TEXT, "v1").click()
    _until(browser, "v1's page", lambda: browser.find_elements(By.ID, "vm"))
    assert "running" in browser.find_element(By.ID, "vm").text
    browser.save_screenshot(str(SCREENSHOTS / "vm.png"))

    # Block this node's host, then stop v1.
    browser.get(site.url + "hosts")
    (host,) = site.cli.json("host", "list")
    browser.find_element(By.CSS_SELECTOR, 'input[form="host-form"]').click()
    browser.find_element(By.ID, "host-block").click()
    _until(browser, "the host blocked", lambda: "host block" in browser.page_source
           and browser.find_element(By.CSS_SELECTOR, "#hosts .blocked").text == "yes")
    assert site.cli.json("host", "list")[0]["Blocked"] == 1
    browser.save_screenshot(str(SCREENSHOTS / "hosts.png"))

    browser.get(site.url + "vms")
    _mark(browser)
    _press(browser, [1], "vm-stop")
    _until(browser, "v1 stopped", lambda: _cell(browser, 1, "state") == "stopped")
    assert _same_page(browser)
    assert site.cli.vm("v1")["State"] == "stopped"

    # Every one of those actions is on the Log page: who, from where, what, how it went.
    browser.get(site.url + "log")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#log tbody tr")]
    for expected in [f"{ADMIN[0]} 127.0.0.1 vm start v1 ids=1 ok",
                     f"{ADMIN[0]} 127.0.0.1 host block {host['Name']} ids={host['Id']} ok",
                     f"{ADMIN[0]} 127.0.0.1 vm stop v1 ids=1 ok",
                     "cli@", "vm start name=v2", "vm stop name=v2"]:
        assert any(expected in row for row in rows), (expected, rows[:8])
    browser.save_screenshot(str(SCREENSHOTS / "log.png"))

    for page in ["users", "images", "config"]:
        browser.get(site.url + page)
        browser.save_screenshot(str(SCREENSHOTS / f"{page}.png"))
    site.cli.run("host", "unblock", "-f", f"name={host['Name']}")


def test_a_viewer_gets_no_buttons(site: Site, browser: WebDriver) -> None:
    _log_in(browser, site.url, *VIEWER)
    browser.get(site.url + "vms")
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-vm]")
    assert not browser.find_elements(By.ID, "vm-form")
    assert not browser.find_elements(By.CSS_SELECTOR, 'input[name="id"]')
    browser.get(site.url + "hosts")
    assert not browser.find_elements(By.ID, "host-form")
    browser.save_screenshot(str(SCREENSHOTS / "vms-viewer.png"))


def test_a_change_from_an_outdated_page_is_refused_on_the_page(
    site: Site, browser: WebDriver
) -> None:
    _log_in(browser, site.url, *ADMIN)
    browser.get(site.url + "vms")
    site.cli.run("vm", "edit", "-f", "name=v2", "name=v2-renamed")
    try:
        _press(browser, [2], "vm-block")
        _until(browser, "the refusal", lambda: "changed since this page was loaded"
               in browser.find_element(By.ID, "results").text)
        assert site.cli.vm("v2-renamed")["Blocked"] == 0
        browser.save_screenshot(str(SCREENSHOTS / "vms-stale.png"))
    finally:
        site.cli.run("vm", "edit", "-f", "name=v2-renamed", "name=v2")


def test_osfs_and_a_staged_image_are_added_and_edited_from_the_images_page(
    site: Site, browser: WebDriver, tarball: Path
) -> None:
    _log_in(browser, site.url, *ADMIN)
    browser.get(site.url + "images")
    browser.find_element(By.ID, "osf-add-name").send_keys("browserosf")
    Select(browser.find_element(By.ID, "osf-add-halt")).select_by_value("SIGUSR2")
    browser.find_element(By.ID, "osf-add").click()
    staged = site.cli.root / "staging" / "browser-import.tar.gz"
    try:
        _until(browser, "the OSF added", lambda: "osf add browserosf" in browser.page_source)
        (osf,) = site.cli.json("osf", "list", "-f", "name=browserosf")
        assert (osf["Memory"], osf["HaltSignal"]) == (256, "SIGUSR2")

        row = f'tr[data-osf="{osf["Id"]}"]'
        browser.find_element(By.CSS_SELECTOR, f"{row} input[name='id']").click()
        browser.find_element(By.ID, "osf-edit-memory").send_keys("400")
        Select(browser.find_element(By.ID, "osf-edit-halt")).select_by_value("init")
        browser.find_element(By.ID, "osf-edit").click()
        _until(browser, "the OSF edited", lambda: browser.find_element(
            By.CSS_SELECTOR, f"{row} .memory").text == "400")
        assert browser.find_element(By.CSS_SELECTOR, f"{row} .halt").text == "-"
        assert site.cli.json("osf", "list", "-f", "name=browserosf")[0]["HaltSignal"] is None

        shutil.copy(tarball, staged)
        browser.refresh()
        Select(browser.find_element(By.ID, "di-add-path")).select_by_visible_text(staged.name)
        Select(browser.find_element(By.ID, "di-add-osf")).select_by_visible_text("browserosf")
        Select(browser.find_element(By.ID, "di-add-halt")).select_by_value("SIGRTMIN+3")
        browser.find_element(By.ID, "di-add").click()
        _until(browser, "the image imported", lambda: staged.name in browser.find_element(
            By.ID, "dis").text)
        browser.save_screenshot(str(SCREENSHOTS / "images-added.png"))
        (di,) = site.cli.json("di", "list", "-f", "osf=browserosf")
        assert (di["Path"], di["HaltSignal"], di["HaltFrom"]) == (staged.name, "SIGRTMIN+3",
                                                                  "di")
        assert "default" in str(di["Tags"])  # the OSF's first image
    finally:
        staged.unlink(missing_ok=True)
        site.cli.run("di", "del", "-f", "osf=browserosf", check=False)
        site.cli.run("osf", "del", "-f", "name=browserosf", check=False)

"""The status page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium, against a real buffer with bsread's Sender as the source (tests/test_web.py's stack) and against
a standalone service with tokens. What the page shows is compared with the buffer's JSON and with what the
source sent for the pulse id the page shows."""
from __future__ import annotations

import json
import os
import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="headless Chromium needs Debian's chromium and chromium-driver "
                                       "(.ci/run installs them)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sf_bsread_writer.tools.simulate import expected_values  # noqa: E402

from .helpers import ROOT, Child, free_port  # noqa: E402
from .test_web import _json, _pub_feed, _ready, stack  # noqa: E402,F401  (the same buffer + source fixture)

SCREENSHOT = ROOT / "docs" / "status-page.png"


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 30, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def _row(driver, channel: str):
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-channel="{channel}"]')


def _shown(driver, channel: str) -> tuple[int, object]:
    """(pulse id, value) a row shows, read in one go: the page updates rows between two separate reads."""
    pulse_id, value = driver.execute_script(
        "const r = document.querySelector(`tr[data-channel='${arguments[0]}']`);"
        "return [r.dataset.pulseId, r.dataset.value];", channel)
    return int(pulse_id), json.loads(value)


def test_the_page_shows_the_buffer_live(stack, browser):
    url, _ = stack
    browser.get(url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "rate").get_attribute("data-value"), message="the rate")
    shown = float(browser.find_element(By.ID, "rate").get_attribute("data-value"))
    rate = _json(url + "/api/v1/status")[1]["buffer"]["rates"]["messages_per_second"]
    # What the page shows is the buffer's own figure (the simulator's 50 Hz is what it manages on a loaded machine).
    assert shown == pytest.approx(rate, rel=0.25) and 0 < shown < 60
    assert "receiving" in browser.find_element(By.ID, "state").text
    assert browser.find_element(By.ID, "connection").text == "live"

    # A value in the table is what the source sent for the pulse id the page shows, and it moves on.
    _wait(browser, lambda d: _row(d, "MIXED:FLOAT64").get_attribute("data-pulse-id"), message="a value")
    first, value = _shown(browser, "MIXED:FLOAT64")
    assert value == expected_values("mixed", first)["MIXED:FLOAT64"][0]
    _wait(browser, lambda d: int(_row(d, "MIXED:FLOAT64").get_attribute("data-pulse-id")) > first,
          message="values change over time")
    _wait(browser, lambda d: _row(d, "MIXED:STRING").get_attribute("data-pulse-id"), message="the string channel")
    pulse_id, text = _shown(browser, "MIXED:STRING")
    assert text == expected_values("mixed", pulse_id)["MIXED:STRING"]
    # An int64 beyond 2^53 (the simulator's is pulse_id - 2^63) is shown exactly, not as the double a
    # browser's JSON.parse makes of it.
    _wait(browser, lambda d: _row(d, "MIXED:INT64").get_attribute("data-pulse-id"), message="the int64 channel")
    pulse_id, shown = browser.execute_script(  # in one call: rows update between two reads
        "const r = document.querySelector(`tr[data-channel='MIXED:INT64']`);"
        "return [r.dataset.pulseId, r.cells[3].textContent];")
    assert shown == str(int(expected_values("mixed", int(pulse_id))["MIXED:INT64"][0]))

    # An image channel renders (the service's PNG), and a waveform gets a plot.
    _row(browser, "MIXED:IMAGE").click()
    _wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('detail-image'); return i.complete && i.naturalWidth > 0 && "
        "i.dataset.pulseId"), message="the image")
    assert browser.execute_script("return document.getElementById('detail-image').naturalWidth") == 32
    _row(browser, "MIXED:ARRAY").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-plot canvas"), message="a waveform plot")
    _row(browser, "MIXED:FLOAT64").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rate-plot canvas")) > 0, message="rate plot")
    if os.environ.get("SF_BSREAD_SCREENSHOT"):  # the one in docs/ is made this way, by hand
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-plot canvas"), message="detail plot")
        browser.save_screenshot(str(SCREENSHOT))


def test_a_wrong_token_shows_the_login_error_and_a_restart_is_survived(browser, tmp_path):
    token = "e" * 24
    tokens = tmp_path / "tokens"
    tokens.write_text(token + "\n", encoding="utf-8")
    feed = _pub_feed(n_channels=5, rate=20.0)
    port = free_port()
    command = ["sf_bsread_writer.web", feed.address, "--status-url", "http://127.0.0.1:9", "--replay",
               "tcp://127.0.0.1:9", "--port", str(port), "--tokens", str(tokens)]
    web = Child.python_module(*command)
    try:
        _ready(web)
        base = f"http://127.0.0.1:{port}/"
        browser.get(base + "?token=wrong-token-wrong-token")
        _wait(browser, lambda d: d.find_element(By.ID, "login-error").is_displayed(), message="the login error")
        assert "not accepted" in browser.find_element(By.ID, "login-error").text
        assert not browser.find_elements(By.CSS_SELECTOR, "tr[data-channel]")  # nothing shown without it

        browser.get(base)
        browser.execute_script("sessionStorage.clear()")
        browser.get(base)
        _wait(browser, lambda d: d.find_element(By.ID, "login").is_displayed(), message="the login form")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "login-button").click()
        _wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", message="live with the token")
        _wait(browser, lambda d: _row(d, "CH0001").get_attribute("data-pulse-id"), message="values")

        web.process.kill()  # the service goes away: the page says so, and comes back by itself
        web.wait(10)
        # The badge's class says "disconnected" for as long as the page is (its text changes while it retries).
        _wait(browser, lambda d: "disconnected" in d.find_element(By.ID, "connection").get_attribute("class"),
              message="disconnected")
        web = Child.python_module(*command)
        _ready(web)
        before = int(_row(browser, "CH0001").get_attribute("data-pulse-id"))
        _wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", message="reconnected")
        _wait(browser, lambda d: int(_row(d, "CH0001").get_attribute("data-pulse-id")) > before,
              message="values after the restart")
    finally:
        web.stop()
        feed.close()

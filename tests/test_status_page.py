"""The status page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium, against a real buffer with bsread's Sender as the source (tests/test_web.py's stack) and against
a standalone service with tokens. What the page shows is compared with the buffer's JSON and with what the
source sent for the pulse id the page shows."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="headless Chromium needs Debian's chromium and chromium-driver "
                                       "(.ci/run installs them)")

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sf_bsread_writer.tools.simulate import expected_values  # noqa: E402
from sf_bsread_writer.web.image import COLORMAP_ANCHORS  # noqa: E402

from .helpers import ROOT, Child, free_port, wait_for, writer_process  # noqa: E402
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
    """Until ``condition`` holds; an element the page rendered anew meanwhile (stale) is looked up again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(lambda d: condition(d), message)


def _row(driver, channel: str):
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-channel="{channel}"]')


def _pulse_id_shown(driver, channel: str) -> int | None:
    """The pulse id a row shows, read by the page itself (None without the row): no element handle is kept, so
    a row the page renders anew between two calls (after a reconnect) cannot go stale under the test."""
    pulse_id = driver.execute_script(
        "const r = document.querySelector(`tr[data-channel='${arguments[0]}']`);"
        "return r ? r.dataset.pulseId : null;", channel)
    return int(pulse_id) if pulse_id else None


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
        _wait(browser, lambda d: _pulse_id_shown(d, "CH0001"), message="values")

        web.process.kill()  # the service goes away: the page says so, and comes back by itself
        web.wait(10)
        # The badge's class says "disconnected" for as long as the page is (its text changes while it retries).
        _wait(browser, lambda d: "disconnected" in d.find_element(By.ID, "connection").get_attribute("class"),
              message="disconnected")
        web = Child.python_module(*command)
        _ready(web)
        before = _pulse_id_shown(browser, "CH0001")
        _wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", message="reconnected")
        _wait(browser, lambda d: (_pulse_id_shown(d, "CH0001") or 0) > before, message="values after the restart")
    finally:
        web.stop()
        feed.close()


# --------------------------------------------------------------------------
# What an operator reads (issue 25): pulse ids, one number format, distinct axis labels, writers, history
# --------------------------------------------------------------------------
def _cells(driver, channel: str) -> tuple[str, str, str]:
    """(data-pulse-id, pulse id cell text, value cell text) of a row, read in one go."""
    return tuple(driver.execute_script(
        "const r = document.querySelector(`tr[data-channel='${arguments[0]}']`);"
        "if (!r) return ['', null, null];"
        "const text = selector => (r.querySelector(selector) || {textContent: null}).textContent;"
        "return [r.dataset.pulseId || '', text('.pulse'), text('.value')];", channel))


def test_each_value_shows_the_pulse_id_it_came_with_in_one_format_per_channel(stack, browser):
    url, _ = stack
    browser.get(url + "/")
    samples: dict[str, list[tuple[int, str]]] = {"MIXED:FLOAT64": [], "MIXED:FLOAT32": [], "MIXED:INT64": [],
                                                  "MIXED:STRING": [], "MIXED:SLOW": []}

    def sampled(driver) -> bool:
        for channel, seen in samples.items():
            data_pulse_id, pulse_text, value_text = _cells(driver, channel)
            if data_pulse_id and (not seen or seen[-1][0] != int(data_pulse_id)):
                assert pulse_text == data_pulse_id, (channel, pulse_text, data_pulse_id)  # the id beside the value
                seen.append((int(pulse_text), value_text))
        return all(len(seen) >= (2 if channel == "MIXED:SLOW" else 6) for channel, seen in samples.items())

    _wait(browser, sampled, timeout=60, message="six updates of every channel")
    for channel, seen in samples.items():
        for pulse_id, text in seen:
            expected = expected_values("mixed", pulse_id)[channel]
            if isinstance(expected, str):
                assert text == expected
            elif expected.dtype.kind == "i":
                assert text == str(int(expected[0]))
            else:  # a float: the source's value within the format's last digit
                assert abs(float(text) - float(expected[0])) <= 0.51 * 10.0 ** -_decimals(text) * max(
                    1.0, 10.0 ** _exponent(text)), (channel, pulse_id, text, expected)
        shapes = {_shape(text) for _, text in seen}
        assert len(shapes) == 1, f"{channel} changes its number format: {seen}"  # 22458344290 vs 2.24583e+10


def _decimals(text: str) -> int:
    mantissa = text.split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def _exponent(text: str) -> int:
    return int(text.split("e")[1]) if "e" in text else 0


def _shape(text: str) -> tuple[bool, int]:
    """A number's format: exponent notation or not, and digits after the point."""
    return "e" in text, _decimals(text)


def test_the_plot_axis_labels_are_distinct_and_whole(stack, browser):
    url, _ = stack
    browser.get(url + "/")
    _wait(browser, lambda d: _row(d, "MIXED:FLOAT64").get_attribute("data-pulse-id"), message="a value")
    _row(browser, "MIXED:FLOAT64").click()  # ~2.2e10, changing by 0.125 a pulse: labels need all their digits

    def labels(driver):
        found = driver.execute_script(
            "return [...document.querySelectorAll('#detail-plot .dygraph-axis-label-y')].map(e => "
            "[e.textContent, e.scrollWidth <= e.clientWidth + 1])")
        return found if len(found) >= 3 else None

    found = _wait(browser, labels, message="y-axis labels")
    texts = [text for text, _ in found]
    assert len(set(texts)) == len(texts), texts
    assert all(whole for _, whole in found), f"clipped: {found}"
    values = sorted(float(text) for text in texts)
    assert 1e9 < values[0] < values[-1]


def test_an_image_shows_its_pulse_id_and_colour_scale(stack, browser):
    url, _ = stack
    browser.get(url + "/")
    _wait(browser, lambda d: _row(d, "MIXED:FLOAT64").get_attribute("data-pulse-id"), message="the table")
    _row(browser, "MIXED:IMAGE").click()

    def shown(driver):
        return driver.execute_script(
            "const i = document.getElementById('detail-image'), s = document.getElementById('colour-scale');"
            "if (!(i.complete && i.naturalWidth > 0 && i.dataset.pulseId && !s.hidden)) return null;"
            "return [i.dataset.pulseId, document.getElementById('image-pulse').textContent, s.dataset.low, "
            "s.dataset.high, document.getElementById('scale-low').textContent, "
            "document.getElementById('scale-high').textContent];")

    pulse_id, caption, low, high, low_text, high_text = _wait(browser, shown, message="the image and its scale")
    assert pulse_id in caption
    image = expected_values("mixed", int(pulse_id))["MIXED:IMAGE"].astype(np.float64)
    expected_low, expected_high = np.percentile(image, [0.5, 99.5])
    assert float(low) == pytest.approx(expected_low) and float(high) == pytest.approx(expected_high)
    assert float(low_text) == pytest.approx(expected_low, abs=0.5) and float(high_text) == pytest.approx(
        expected_high, abs=0.5)
    bar = browser.find_element(By.ID, "scale-bar")
    gradient = bar.value_of_css_property("background-image")
    assert bar.is_displayed() and "linear-gradient" in gradient
    # The bar's colours are the service's colour map (web/image.py), low to high.
    shown = tuple(tuple(int(c) for c in rgb) for rgb in re.findall(r"rgb\((\d+), (\d+), (\d+)\)", gradient))
    assert shown == COLORMAP_ANCHORS


def test_a_writer_row_shows_its_file_range_progress_and_rate(stack, browser, tmp_path):
    url, endpoints = stack
    browser.get(url + "/")
    status = _json(url + "/api/v1/status")[1]
    newest = status["look_back"]["newest_pulse_id"]
    start, stop = newest - 50, newest + 3000  # a minute still to come at 50 Hz: the session is seen reading
    output = tmp_path / "operator-run.h5"
    child, client = writer_process(endpoints["replay"], output)
    try:
        client.set_parameters({"general/created": "now", "general/user": "operator", "general/process": "page",
                               "general/instrument": "test"})
        client.stop_pulse_id(stop)
        client.start_pulse_id(start)

        def row(driver):
            cells = driver.execute_script(
                "return [...document.querySelectorAll('#writers tbody tr')].map(r => "
                "[...r.cells].map(c => c.textContent).concat([r.dataset.progress || '']))")
            return next((found for found in cells if "operator-run.h5" in found[0]), None)

        def moving(driver):
            found = row(driver)
            # the rate needs two of the service's status polls (a second apart)
            return found if found and found[-1] and 0 < float(found[-1]) < 1 and found[3] != "-" else None

        found = _wait(browser, moving, message="the writer's row with its progress and rate")
        file, requested, progress_text, rate_text = found[0], found[1], found[2], found[3]
        assert file.endswith("operator-run.h5")
        assert requested == f"{start} .. {stop}"
        assert re.fullmatch(r"\d{1,3}(\.\d)? %", progress_text), progress_text
        assert re.fullmatch(r"[\d.]+ msg/s", rate_text), rate_text
        if os.environ.get("SF_BSREAD_SCREENSHOT"):  # docs/status-page.png is made this way, by hand
            _row(browser, "MIXED:FLOAT64").click()
            _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail-plot canvas"), message="detail plot")
            _wait(browser, moving, message="the writer's row, still reading")
            browser.save_screenshot(str(SCREENSHOT))
        assert child.stop() == 3  # SIGTERM: the file is closed, partial (the stop was not reached)
    finally:
        child.stop()


def test_the_plots_start_with_the_recent_past(stack, browser):
    url, _ = stack

    def held() -> dict | None:
        """The service's history, once it reaches 5 s back (it starts with the service)."""
        document = _json(url + "/api/v1/history", channels="MIXED:FLOAT64,MIXED:IMAGE,NOPE:X")[1]
        times = document["channels"]["MIXED:FLOAT64"]["timestamp"]
        return document if times and times[-1] - times[0] >= 5 and len(document["rates"]["time"]) >= 5 else None

    history = wait_for(held, timeout=60, interval=0.5, message="5 s of history")
    points = history["channels"]["MIXED:FLOAT64"]
    assert len(points["pulse_id"]) >= 5
    for pulse_id, value in zip(points["pulse_id"], points["value"]):
        assert value == expected_values("mixed", pulse_id)["MIXED:FLOAT64"][0]
    assert sorted(history["not_held"]) == ["MIXED:IMAGE", "NOPE:X"]
    assert len(history["rates"]["time"]) >= 3
    code, refused = _json(url + "/api/v1/history", channels=",".join(f"CH{i}" for i in range(1001)))
    assert code == 400 and "at most 1000" in refused["status"]  # a bounded answer, and says why

    browser.get(url + "/")
    opened = browser.execute_script("return Date.now()") / 1000
    # The sparkline and the rate plot hold what came before the page opened (live points are all newer).
    _wait(browser, lambda d: d.execute_script(
        "const e = page.channels.get('MIXED:FLOAT64');"
        "return e && e.points.length >= 5 && e.points[0][0] / 1000 < arguments[0] - 3 && "
        "page.ratePoints.length >= 3 && page.ratePoints[0][0] / 1000 < arguments[0] - 2;", opened),
          message="history")
    _row(browser, "MIXED:FLOAT64").click()
    _wait(browser, lambda d: d.execute_script(
        "return page.detailPoints.length >= 5 && page.detailPoints[0][0] / 1000 < arguments[0] - 3", opened),
          message="the detail plot's history")

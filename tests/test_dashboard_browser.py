"""The DistBelief dashboard page in headless Chromium, on a cluster daskbelief started.

The page is opened before training (it must render empty), then the events of a Downpour and a
Sandblaster run must reach every plot in the browser through the page's periodic updates. A
screenshot is saved in the test's tmp_path.
Without Chromium and its driver (Debian packages ``chromium``, ``chromium-driver``) the test is
skipped, saying why and how to run it; ``.ci/run`` installs them and sets
``DASKBELIEF_REQUIRE_BROWSER=1``, under which their absence is a failure rather than a skip.
"""
from __future__ import annotations

import os

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from daskbelief.cluster import client_or_local
from daskbelief.monitor.dashboard import page_url
from daskbelief.nn import Dense, Sequential
from daskbelief.train.downpour import downpour
from daskbelief.train.sandblaster import sandblaster

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRED = "DASKBELIEF_REQUIRE_BROWSER"

# The page's data sources (named daskbelief:<plot>:<key>) and how many rows each holds, plus
# the header's text; null until BokehJS has built the document from the server.
PAGE_STATE = """
const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
if (!doc) { return null; }
const sources = {};
for (const m of doc.all_models) {
  if (m.name && m.name.startsWith("daskbelief:") && m.data !== undefined) {
    sources[m.name] = m.get_length() || 0;
  }
}
return {header: doc.get_model_by_name("daskbelief:header").text, sources: sources};
"""


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver, with a fresh profile; quit afterwards."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        why = (f"{', '.join(missing)} missing: to run this test, install the Debian packages "
               "chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
        if os.environ.get(REQUIRED) == "1":
            pytest.fail(f"{why} [{REQUIRED}=1: required here]")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1200",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def state_when(driver, ready, timeout=60):
    """Poll the page's state until ``ready(state)``; the last state on timeout (for the message)."""
    seen = []

    def check(d):
        seen.append(d.execute_script(PAGE_STATE))
        return seen[-1] is not None and ready(seen[-1])

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.25).until(check)
    except Exception as e:  # noqa: BLE001 -- re-raised with what the page showed
        raise AssertionError(f"the page never got there; last state: {seen[-1:]}") from e
    return seen[-1]


def test_dashboard_page_renders_live_training_data_in_chromium(browser, digits_path, tmp_path):
    model = Sequential(input_shape=(64,), layers=[Dense(32, activation="relu"), Dense(10)],
                       loss="softmax_cross_entropy", l2=1e-4)
    with client_or_local(None, n_workers=2) as client:
        browser.get(page_url(client.dashboard_link))
        state_when(browser, lambda s: "No daskbelief runs yet" in s["header"])

        downpour(model, digits_path, test=digits_path, client=client, replicas=2, shards=2,
                 steps=900, batch_size=16, report_every=10, eval_every=0.3, seed=0)
        sandblaster(model, digits_path, test=digits_path, client=client, iterations=4, seed=0)

        def filled(state):
            rows = state["sources"]
            return all(any(n > 0 for name, n in rows.items() if name.startswith(f"daskbelief:{p}:"))
                       for p in ("loss", "samples", "accuracy", "traffic", "iteration-loss")) \
                and rows.get("daskbelief:staleness", 0) > 0 \
                and rows.get("daskbelief:portions", 0) > 0
        state = state_when(browser, filled)
        assert "downpour" in state["header"]
        state_when(browser, lambda s: "ended" in s["header"])  # Sandblaster's last event is in
        screenshot = tmp_path / "daskbelief-dashboard.png"
        assert browser.save_screenshot(str(screenshot))
    print(f"dashboard screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000

"""The server's page in a real headless browser (Debian's chromium, driven by selenium): type a sentence,
see its translation and its n-best list, open the attention heat map. Skipped where chromium is missing
(CI installs it: .ci/run)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_serve import SETTINGS, Server  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# SCREENSHOT=docs/img/serve_heatmap.png python -m pytest tests/test_serve_page.py: the heat map the docs show.
SCREENSHOT = os.environ.get("SCREENSHOT")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: chromium refuses to start as root (CI's containers) with its sandbox on.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_translates_as_you_type_and_shows_the_heat_map(served_checkpoint, browser, tmp_path):
    server = Server(served_checkpoint, tmp_path / "server.log", *SETTINGS, "source_lang=de", "target_lang=en")
    try:
        expected = server.translate(src=["w1 w2 w3 w4", "w5 w6 w7"], nbest=3).json()
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "parameters" in b.find_element(By.ID, "model").text)
        assert browser.find_element(By.ID, "pair").text == "de → en"
        browser.find_element(By.ID, "source").send_keys("w1 w2 w3 w4\nw5 w6 w7")

        def translations(b: webdriver.Chrome) -> list[str]:
            done = b.find_elements(By.CSS_SELECTOR, "#translations > li.done .tgt")
            return [element.text for element in done]

        wait.until(lambda b: translations(b) == expected["tgt"])
        first = browser.find_elements(By.CSS_SELECTOR, "#translations > li")[0]
        first.find_element(By.TAG_NAME, "summary").click()  # the n-best list
        shown = [e.text for e in first.find_elements(By.CSS_SELECTOR, "details li .text")]
        assert shown == [h["text"] for h in expected["nbest"][0]]
        first.find_element(By.CSS_SELECTOR, "button.heatmap-button").click()
        table = wait.until(lambda b: b.find_elements(By.ID, "heatmap"))[0]
        attention = server.translate(src=["w1 w2 w3 w4"], attention=True).json()["attention"][0]
        columns = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")][1:]
        rows = [th.text for th in table.find_elements(By.CSS_SELECTOR, "tbody th")]
        assert columns == attention["source"] and rows == attention["target"]
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody td")) == len(rows) * len(columns)
        if SCREENSHOT:
            Path(SCREENSHOT).write_bytes(browser.find_element(By.ID, "attention").screenshot_as_png)
    finally:
        server.stop()

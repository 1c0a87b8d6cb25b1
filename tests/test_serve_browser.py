"""The page of ``emorl serve`` in a real browser (headless Chromium from the system, driven by selenium): it loads
the run's objectives, a slider moves by keyboard, Generate streams a reply, the page says why the reply stopped and
how long it is, and the score bars fill.

Skips where no Chromium/chromedriver is installed (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run``
installs them). ``EMORL_SERVE_SCREENSHOT=path.png`` also saves a screenshot of the page after the reply."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from browser import chrome, needs_browser  # noqa: E402 - after the importorskips

pytestmark = needs_browser


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_serve import Server, make_run

    from emorl.serve import Engine, create_app

    run = make_run(tmp_path_factory.mktemp("serve-page"))
    engine = Engine(run, max_wait_ms=5, max_tokens=64)
    server = Server(create_app(engine))
    driver = chrome()
    try:
        yield {"driver": driver, "url": server.url, "engine": engine}
    finally:
        driver.quit()
        server.stop()
        engine.close()


def test_page_steers_generates_and_scores(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = page["driver"]
    d.get(page["url"] + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_elements(By.ID, "w-short"))
    # the searched preset is applied on load (mode hidden: 0.5, 0.25, 1.0)
    assert d.find_element(By.ID, "v-long").text == "0.25"
    assert len(d.find_elements(By.CSS_SELECTOR, "#front circle.pt")) == 3
    assert d.find_elements(By.CSS_SELECTOR, "#front circle.cur")
    presets = [b.text for b in d.find_elements(By.CSS_SELECTOR, "#presets button")]
    assert presets == ["searched (hidden)", "short alone", "long alone", "fluency alone"]
    # keyboard: focus the slider and move it
    slider = d.find_element(By.ID, "w-long")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert d.find_element(By.ID, "v-long").text == "0.35"
    temp = d.find_element(By.ID, "temperature")
    d.execute_script("arguments[0].value = '0'", temp)  # greedy: the reply can be checked against generate
    mt = d.find_element(By.ID, "max-tokens")
    d.execute_script("arguments[0].value = '6'", mt)
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("My cat is sick.")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter generates
    wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or
               d.find_element(By.ID, "status").text.startswith("error"))
    assert d.find_element(By.ID, "status").text == "done"
    reply = d.find_element(By.ID, "reply").text
    engine = page["engine"]
    ref = engine.ens.generate(["My cat is sick."], [0.5, 0.35, 1.0], anchor="base", max_new_tokens=6).texts[0]
    assert reply == ref.strip()
    # why it stopped and how long it is: 6 tokens, cut at max_tokens (the tiny model does not end by itself)
    finish = d.find_element(By.ID, "finish").text
    assert finish.startswith("6 tokens") and "finish_reason: length" in finish, finish
    values = [d.find_element(By.ID, f"s-{o}").text for o in ("short", "long", "fluency")]
    assert all(v != "–" and 0 <= float(v) <= 1 for v in values)
    width = d.find_element(By.ID, "b-short").get_attribute("style")
    assert "width" in width
    assert d.find_elements(By.CSS_SELECTOR, "#front rect.reply")  # the reply's own point on the scatter
    shot = os.environ.get("EMORL_SERVE_SCREENSHOT")
    if shot:
        d.save_screenshot(shot)


def test_page_is_readable_at_narrow_width(page: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d = page["driver"]
    d.set_window_size(390, 900)
    try:
        d.get(page["url"] + "/")
        width = d.execute_script("return document.documentElement.scrollWidth")
        assert width <= 400  # one column, no horizontal scrolling
        assert d.find_element(By.ID, "generate").is_displayed()
    finally:
        d.set_window_size(1280, 900)

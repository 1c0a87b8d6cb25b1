"""The blind A/B page of ``emorl judge`` in a real browser (headless Chromium from the system, driven by selenium):
clicks answer each criterion, Save records the answer with the sides mapped back to the methods, a reload
continues where the rater stopped, nothing on the page names a method; the offline HTML file works from file://
and its downloaded answers import and score.

Skips where no Chromium/chromedriver is installed (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run``
installs them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from browser import chrome, needs_browser  # noqa: E402 - after the importorskips

pytestmark = needs_browser

CRITERIA = ["reflection", "empathy", "fluency", "overall"]


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = chrome()
    try:
        yield d
    finally:
        d.quit()


def wait_for(d: Any, what: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, 30).until(what)


def answer_item(d: Any, picks: dict[str, str]) -> str:
    """Click one choice per criterion and Save; returns the statement that was shown."""
    from selenium.webdriver.common.by import By

    wait_for(d, lambda d: d.find_element(By.ID, "item").is_displayed())
    prompt = d.find_element(By.ID, "prompt").text
    before = d.find_element(By.ID, "progress").text
    save = d.find_element(By.ID, "save")
    for i, (crit, pick) in enumerate(picks.items()):
        assert not save.is_enabled()  # every criterion needs its click first
        d.find_element(By.ID, f"c-{crit}-{pick}").click()
        assert d.find_element(By.ID, f"c-{crit}-{pick}").get_attribute("aria-pressed") == "true"
        assert i == len(picks) - 1 or not save.is_enabled()
    assert save.is_enabled()
    save.click()
    wait_for(d, lambda d: d.find_element(By.ID, "progress").text != before)
    return prompt


def test_served_page_records_clicks_and_resumes(driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from test_judge import LABELS, METHODS, make_run
    from test_serve import Server

    from emorl.judge.app import Session, create_app
    from emorl.judge.store import AnswerStore, build_items

    run = make_run(tmp_path)
    items = build_items(run, [("emorl", "uniform")], 4)
    server = Server(create_app(Session(items, CRITERIA, "ann", AnswerStore(run))))
    try:
        d = driver
        d.get(server.url + "/")
        wait_for(d, lambda d: d.find_elements(By.ID, "c-overall-left"))
        assert d.find_element(By.ID, "progress").text == "0 of 4 answered"
        page = d.find_element(By.TAG_NAME, "body").text + d.page_source
        for m in [*METHODS, *LABELS.values()]:
            assert m not in page, m  # blind: no method name in the page or its data
        picks = [{"reflection": "left", "empathy": "tie", "fluency": "right", "overall": "left"},
                 {"reflection": "right", "empathy": "right", "fluency": "tie", "overall": "right"}]
        shown = [answer_item(d, p) for p in picks]
        assert d.find_element(By.ID, "progress").text == "2 of 4 answered"
        rows = AnswerStore(run).read()
        assert [r["prompt"] for r in rows] == shown
        for r, p in zip(rows, picks, strict=True):
            assert r["choices"] == p and r["rater"] == "ann"
            win = "a" if r["left"] == "emorl" else "b"  # "left" means emorl's reply exactly when it was on the left
            assert r["verdicts"]["reflection"] == r["verdicts"]["overall"] == (win if p["overall"] == "left"
                                                                               else {"a": "b", "b": "a"}[win])
        d.refresh()  # a reload (or a restarted server) continues with the next unanswered item
        wait_for(d, lambda d: d.find_element(By.ID, "progress").text == "2 of 4 answered")
        wait_for(d, lambda d: d.find_element(By.ID, "prompt").text not in ("", *shown))
        for _ in range(2):
            answer_item(d, dict.fromkeys(CRITERIA, "tie"))
        wait_for(d, lambda d: d.find_element(By.ID, "done").is_displayed())
        assert d.find_element(By.ID, "progress").text == "4 of 4 answered"
        assert len(AnswerStore(run).read()) == 4
        d.set_window_size(390, 900)  # a phone: one column, no horizontal scrolling
        try:
            d.get(server.url + "/")
            wait_for(d, lambda d: d.find_element(By.ID, "done").is_displayed())
            assert d.execute_script("return document.documentElement.scrollWidth") <= 400
        finally:
            d.set_window_size(1280, 900)
    finally:
        server.stop()


def test_offline_file_downloads_answers_that_import(driver: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from test_judge import METHODS, make_run

    from emorl.cli import main
    from emorl.judge.store import AnswerStore

    run = make_run(tmp_path)
    html = tmp_path / "ab.html"
    assert main(["judge", "--run", str(run), "--pairs", "emorl:soups", "--n", "3", "--html", str(html),
                 "--rater", "cy", "--criteria", "overall"]) == 0
    text = html.read_text()
    assert not any(f'"{m}"' in text for m in METHODS)
    d = driver
    d.get(html.as_uri())
    d.execute_script("localStorage.clear()")
    d.refresh()
    wait_for(d, lambda d: d.find_element(By.ID, "progress").text == "0 of 3 answered")
    assert d.find_element(By.ID, "offline").is_displayed() and d.find_element(By.ID, "download").is_displayed()
    answer_item(d, {"overall": "left"})
    answer_item(d, {"overall": "right"})
    d.refresh()  # answers stay in the browser: the page continues at the third item
    wait_for(d, lambda d: d.find_element(By.ID, "progress").text == "2 of 3 answered")
    jsonl = d.execute_script("return window.abJudge.offline.jsonl()")
    down = tmp_path / "judge-answers-cy.jsonl"
    down.write_text(jsonl)
    assert [json.loads(x)["choices"]["overall"] for x in jsonl.splitlines()] == ["left", "right"]
    assert main(["judge", "--run", str(run), "--import", str(down)]) == 0
    rows = AnswerStore(run).read()
    assert [r["rater"] for r in rows] == ["cy", "cy"] and [r["choices"]["overall"] for r in rows] == ["left", "right"]
    assert main(["judge", "--run", str(run), "--score"]) == 0
    summary = json.loads((run / "judge" / "summary.json").read_text())
    o = summary["pairs"][0]["criteria"]["overall"]
    assert o["wins"] + o["losses"] == 2 and o["ties"] == 0

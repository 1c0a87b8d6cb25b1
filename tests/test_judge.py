"""emorl judge without a browser: the statistics on hand-checkable counts, the blind plan (no method names reach
the page, sides balanced, same prompt and seed on both sides), resume and atomic appends, import of an offline
page's answers, the errors, and the report's section. The run is hand-made (results.json + replies), no model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from emorl.judge import stats
from emorl.judge.store import (
    AnswerStore,
    build_items,
    criteria_for,
    evaluated,
    import_answers,
    parse_pairs,
    read_plan,
    record_plan,
    verdict,
)
from emorl.utils import EmorlError

METHODS = ["base", "emorl", "uniform", "soups", "single:empathy"]
LABELS = {"base": "Base model", "emorl": "EMORL", "uniform": "Uniform Weighted", "soups": "Model Soups",
          "single:empathy": "empathy adapter alone"}
OBJECTIVES = ["reflection", "empathy", "fluency"]
PROMPTS = 10
SEEDS = [0, 1]


def reply_text(m: int, seed: int, i: int) -> str:
    """A reply that names no method (so any method name on the page is a leak)."""
    return f"reply number {m * 100 + seed * 10 + i} to statement {i}"


def make_run(root: Path) -> Path:
    run = root / "run"
    (run / "eval" / "replies").mkdir(parents=True)
    methods = {m: {"label": LABELS[m], "kind": "x"} for m in METHODS}
    (run / "eval" / "results.json").write_text(json.dumps({"version": 1, "split": "test", "objectives": OBJECTIVES,
                                                          "seeds": SEEDS, "prompts": PROMPTS, "methods": methods}))
    for k, m in enumerate(METHODS):
        lines = [json.dumps({"seed": s, "prompt": f"statement {i}: I feel odd today.", "reply": reply_text(k, s, i)})
                 for s in SEEDS for i in range(PROMPTS)]
        (run / "eval" / "replies" / f"{m}.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


# ------------------------------------------------------------------------------------------- statistics

def exact_two_sided(k: int, n: int) -> float:
    """The naive reference: 2 x P(X <= min(k, n-k)) for X ~ Binomial(n, 1/2), capped at 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_sign_test_hand_checked() -> None:
    assert stats.sign_test(9, 1) == pytest.approx(22 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    assert stats.sign_test(1, 9) == pytest.approx(22 / 1024)
    assert stats.sign_test(0, 3) == pytest.approx(0.25)  # 2 * 1/8
    assert stats.sign_test(5, 5) == 1.0
    assert stats.sign_test(0, 0) == 1.0  # nothing decided: no evidence
    for k, n in [(44, 60), (39, 61), (21, 26), (19, 38), (3, 17)]:
        assert stats.sign_test(k, n - k) == pytest.approx(exact_two_sided(k, n), rel=1e-9)
    # the probe in research/judging.md: 44-16 p = 0.0004, 39-22 p = 0.04, 21-5 p = 0.002
    assert round(stats.sign_test(44, 16), 4) == 0.0004
    assert round(stats.sign_test(39, 22), 2) == 0.04
    assert round(stats.sign_test(21, 5), 3) == 0.002


def test_wilson_hand_checked() -> None:
    z2 = 1.959963984540054 ** 2
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(z2 / (10 + z2))  # k = 0: the upper bound is z²/(n + z²) = 0.2775
    lo, hi = stats.wilson(10, 10)
    assert lo == pytest.approx(10 / (10 + z2)) and hi == pytest.approx(1.0)
    lo, hi = stats.wilson(5, 10)  # the textbook value for 5/10: [0.2366, 0.7634]
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = stats.wilson(9, 10)  # centre (0.9 + z²/20)/(1 + z²/10), asymmetric around 0.9
    assert (round(lo, 4), round(hi, 4)) == (0.5958, 0.9821)
    assert stats.wilson(0, 0) is None


def test_holm_hand_checked() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def answer(item: str, a: str, b: str, verdicts: dict[str, str], rater: str = "ann") -> dict[str, Any]:
    return {"item": item, "rater": rater, "a": a, "b": b, "verdicts": verdicts}


def test_summary_of_hand_made_answers() -> None:
    rows = [answer(f"i{j}", "emorl", "uniform", {"overall": "a", "fluency": "tie"}) for j in range(9)]
    rows += [answer("i9", "emorl", "uniform", {"overall": "b", "fluency": "tie"})]
    rows += [answer("i10", "emorl", "uniform", {"overall": "tie", "fluency": "a"})]
    rows += [answer("i0", "emorl", "uniform", {"overall": "b", "fluency": "b"})]  # a repeat: the first answer counts
    rows += [answer("j0", "uniform", "emorl", {"overall": "a", "fluency": "b"}, rater="bob")]  # asked the other way
    s = stats.summarise(rows, LABELS)
    assert s["answers"] == 12 and s["raters"] == ["ann", "bob"]
    (pair,) = s["pairs"]
    assert (pair["a"], pair["label_b"]) == ("emorl", "Uniform Weighted")
    o = pair["criteria"]["overall"]
    assert (o["wins"], o["ties"], o["losses"], o["decided"]) == (9, 1, 2, 11)  # bob's "uniform better" is a loss
    assert o["win_rate"] == pytest.approx(9 / 11)
    assert o["p"] == pytest.approx(exact_two_sided(9, 11))  # 2 * (1 + 11 + 55) / 2048 = 0.0654
    assert o["p"] == pytest.approx(134 / 2048)
    f = pair["criteria"]["fluency"]
    assert (f["wins"], f["ties"], f["losses"]) == (2, 10, 0)  # bob's "emorl better" is a win
    assert f["p"] == pytest.approx(0.5)
    assert o["p_holm"] == pytest.approx(2 * 134 / 2048) and f["p_holm"] == pytest.approx(0.5)  # 2 x, then 1 x
    assert o["verdict"] == "unresolved" and f["verdict"] == "unresolved"
    strong = stats.summarise([answer(f"k{j}", "emorl", "base", {"overall": "b"}) for j in range(8)])
    assert strong["pairs"][0]["criteria"]["overall"]["verdict"] == "b"  # 0-8: p = 2/256
    text = stats.format_summary(s)
    assert "emorl (A: EMORL) vs uniform (B: Uniform Weighted)" in text and "unresolved" in text
    # two raters of the same prompts: each prompt counts once, for the side most of its answers preferred
    votes = {0: ["a", "a"], 1: ["a", "b"], 2: ["b", "b"], 3: ["a", "tie"]}
    both = [{**answer(f"p{i}{r}", "emorl", "soups", {"overall": v}, rater=r), "prompt_index": i}
            for i, vs in votes.items() for r, v in zip(("ann", "bob"), vs, strict=True)]
    c = stats.summarise(both)["pairs"][0]["criteria"]["overall"]
    assert (c["wins"], c["ties"], c["losses"]) == (4, 1, 3)  # answers
    assert c["prompts"] == {"wins": 2, "ties": 1, "losses": 1} and c["decided"] == 3  # prompts 0 and 3 / 1 / 2
    assert c["p"] == pytest.approx(1.0) and c["win_rate"] == pytest.approx(2 / 3)  # 2 x (1 + 3) / 8, capped
    order = stats.summarise(rows + [answer("k", "soups", "base", {"overall": "a"})], order=[("soups", "base")])
    assert [(p["a"], p["b"]) for p in order["pairs"]] == [("soups", "base"), ("emorl", "uniform")]  # as listed
    with pytest.raises(EmorlError, match="no answers"):
        stats.summarise([])


# ------------------------------------------------------------------------------------------- the plan

def test_pairs_and_errors(run: Path) -> None:
    results = evaluated(run)
    methods = list(results["methods"])
    assert parse_pairs("emorl:uniform, emorl:soups", methods) == [("emorl", "uniform"), ("emorl", "soups")]
    assert parse_pairs("emorl:single:empathy", methods) == [("emorl", "single:empathy")]
    with pytest.raises(EmorlError, match=r"unknown method 'unifrm'.*base, emorl, uniform, soups, single:empathy"):
        parse_pairs("emorl:unifrm", methods)
    with pytest.raises(EmorlError, match="with itself"):
        parse_pairs("emorl:emorl", methods)
    with pytest.raises(EmorlError, match="twice"):
        parse_pairs("emorl:uniform,uniform:emorl", methods)
    with pytest.raises(EmorlError, match=r"--n 11: the run's evaluation has 10 prompts"):
        build_items(run, [("emorl", "uniform")], 11)
    with pytest.raises(EmorlError, match="not been evaluated.*emorl evaluate --run"):
        evaluated(run.parent / "elsewhere")
    (run / "eval" / "replies" / "soups.jsonl").unlink()
    with pytest.raises(EmorlError, match=r"soups.jsonl is missing.*--methods soups --force"):
        build_items(run, [("emorl", "soups")], 3)
    assert criteria_for(results) == ["reflection", "empathy", "fluency", "overall"]


def test_items_are_blind_balanced_and_paired(run: Path) -> None:
    pairs = [("emorl", "uniform"), ("emorl", "soups")]
    items = build_items(run, pairs, None)
    assert len(items) == 2 * PROMPTS
    for n in range(1, PROMPTS + 1):  # sides balanced within one for any --n (blocks of two along the prompts)
        sub = build_items(run, pairs, n)
        for a, b in pairs:
            left_a = sum(it.left == a for it in sub if (it.a, it.b) == (a, b))
            assert abs(left_a - (n - left_a)) <= 1
        assert {it.id for it in sub} <= {it.id for it in items}  # a larger --n keeps the earlier items
    both = {(it.prompt_index, it.seed) for it in items if it.b == "uniform"}
    assert both == {(it.prompt_index, it.seed) for it in items if it.b == "soups"}  # the same prompts for every pair
    k = {m: i for i, m in enumerate(METHODS)}
    for it in items:  # both replies answer the same prompt under the same seed
        assert it.left_reply == reply_text(k[it.left], it.seed, it.prompt_index)
        assert it.right_reply == reply_text(k[it.right], it.seed, it.prompt_index)
    assert {it.seed for it in items} == set(SEEDS)
    again = build_items(run, pairs, None)
    assert [it.id for it in again] == [it.id for it in items]  # seeded
    other = build_items(run, pairs, None, seed=1)
    assert [it.id for it in other] != [it.id for it in items]
    shown = json.dumps([it.public() for it in items])
    for m in [*METHODS, *LABELS.values(), "seed"]:
        assert m not in shown, m
    assert set(items[0].public()) == {"id", "prompt", "left", "right"}


# ------------------------------------------------------------------------------------------- answers

def test_answers_resume_and_map_sides(run: Path) -> None:
    from emorl.judge.app import Session

    items = build_items(run, [("emorl", "uniform")], 6)
    crit = ["empathy", "overall"]
    first = Session(items, crit, "ann", AnswerStore(run))
    shown = []
    for choice in ("left", "right", "tie"):
        item = first.next()["item"]
        shown.append(item["id"])
        assert first.answer(item["id"], {"empathy": choice, "overall": "left"})["saved"]
    assert first.answer(shown[0], {"empathy": "tie", "overall": "tie"})["saved"] is False  # not asked twice
    restarted = Session(build_items(run, [("emorl", "uniform")], 6), crit, "ann", AnswerStore(run))
    nxt = restarted.next()
    assert nxt["answered"] == 3 and nxt["item"]["id"] not in shown
    assert Session(items, crit, "bob", AnswerStore(run)).next()["answered"] == 0  # each rater resumes their own
    rows = AnswerStore(run).read()
    assert [r["item"] for r in rows] == shown
    by_id = {it.id: it for it in items}
    for r, choice in zip(rows, ("left", "right", "tie"), strict=True):
        it = by_id[r["item"]]
        assert (r["a"], r["b"], r["left"], r["prompt_index"], r["seed"]) == ("emorl", "uniform", it.left,
                                                                              it.prompt_index, it.seed)
        assert r["verdicts"]["empathy"] == verdict(choice, it.left, "emorl")
        assert r["verdicts"]["overall"] == ("a" if it.left == "emorl" else "b")
        assert r["replies"] == {"left": it.left_reply, "right": it.right_reply}
    assert verdict("left", "emorl", "emorl") == "a" and verdict("left", "uniform", "emorl") == "b"
    assert verdict("right", "uniform", "emorl") == "a" and verdict("tie", "uniform", "emorl") == "tie"
    with pytest.raises(EmorlError, match="one choice for each criterion"):
        first.answer(nxt["item"]["id"], {"empathy": "left"})
    with pytest.raises(EmorlError, match="must be one of left, tie, right"):
        first.answer(nxt["item"]["id"], {"empathy": "A", "overall": "left"})
    with pytest.raises(EmorlError, match="not an item"):
        first.answer("nope", {"empathy": "left", "overall": "left"})
    assert len(AnswerStore(run).read()) == 3  # a refused answer writes nothing


def test_a_torn_last_line_is_cut_before_the_next_append(run: Path) -> None:
    items = build_items(run, [("emorl", "uniform")], 3)
    store = AnswerStore(run)
    assert store.add(items[0], "ann", {"overall": "left"}, ["overall"])
    with open(store.path, "a", encoding="utf-8") as f:
        f.write('{"item": "' + items[1].id + '", "rater": "ann", "a": "emo')  # a writer killed mid-line
    assert [r["item"] for r in store.read()] == [items[0].id]  # the reader skips the torn line
    assert store.add(items[1], "ann", {"overall": "right"}, ["overall"])  # not answered: asked again
    lines = store.path.read_text().splitlines()
    assert [json.loads(x)["item"] for x in lines] == [items[0].id, items[1].id]  # every line whole


def test_offline_answers_import_through_the_plan(run: Path, tmp_path: Path) -> None:
    from emorl.judge.page import page_data, render_html

    pairs = [("emorl", "soups")]
    items = build_items(run, pairs, 4)
    plan = record_plan(run, items, {"pairs": [["emorl", "soups"]]})
    assert read_plan(run)["salt"] == plan["salt"]
    data = page_data(items, ["overall"], "cy", plan["salt"])
    html = render_html(data)
    assert "/static/" not in html and "http" not in html.lower().replace("http-equiv", "")  # nothing to fetch
    for m in [*METHODS, *LABELS.values()]:
        assert m not in json.dumps(data) and f'"{m}"' not in html
    down = tmp_path / "answers.jsonl"
    down.write_text("".join(json.dumps({"item": it.id, "rater": "cy", "plan": data["plan"],
                                        "choices": {"overall": "left"}}) + "\n" for it in items[:3]))
    assert import_answers(run, down) == (3, 0)
    assert import_answers(run, down) == (0, 3)  # importing twice adds nothing
    rows = AnswerStore(run).read()
    assert [r["verdicts"]["overall"] for r in rows] == [("a" if it.left == "emorl" else "b") for it in items[:3]]
    assert {r["rater"] for r in rows} == {"cy"} and {r["source"] for r in rows} == {"html"}
    down.write_text(json.dumps({"item": items[3].id, "choices": {}}) + "\n")
    with pytest.raises(EmorlError, match=r"answers.jsonl:1: no choices"):
        import_answers(run, down)
    down.write_text(json.dumps({"item": items[3].id, "choices": {"overall": "better"}}) + "\n")
    with pytest.raises(EmorlError, match=r"answers.jsonl:1: .*one of left, tie, right"):
        import_answers(run, down)
    down.write_text(json.dumps({"item": "0123456789abcdef", "choices": {"overall": "left"}}) + "\n")
    with pytest.raises(EmorlError, match=r"answers.jsonl:1: item '0123456789abcdef' is not in"):
        import_answers(run, down)


def test_score_command_and_report_section(run: Path, capsys: pytest.CaptureFixture) -> None:
    from emorl.cli import main
    from emorl.report.human import human_lines

    assert main(["judge", "--run", str(run), "--score"]) == 2  # nothing answered yet: a clear error
    assert "no one has judged this run yet" in capsys.readouterr().err
    assert main(["judge", "--run", str(run), "--pairs", "emorl:uniform", "--n", "40"]) == 2
    assert "has 10 prompts" in capsys.readouterr().err
    items = build_items(run, [("emorl", "uniform")], 10)
    store = AnswerStore(run)
    for it in items:  # emorl better on every item, whichever side it was on
        store.add(it, "ann", {"overall": "left" if it.left == "emorl" else "right"}, ["overall"])
    assert human_lines(run) == []  # not scored yet
    assert main(["judge", "--run", str(run), "--score"]) == 0
    out = capsys.readouterr().out
    assert "emorl (A: EMORL) vs uniform (B: Uniform Weighted)" in out and "emorl preferred" in out
    summary = json.loads((run / "judge" / "summary.json").read_text())
    o = summary["pairs"][0]["criteria"]["overall"]
    assert (o["wins"], o["losses"], o["p"]) == (10, 0, pytest.approx(2 / 1024))
    text = "\n".join(human_lines(run))
    row = ("| EMORL vs Uniform Weighted | overall | 10/0/0 | 10/0/0 | 1.00 [0.72, 1.00] | 0.002 | 0.002 "
           "| EMORL preferred |")
    assert row in text
    store.add(build_items(run, [("emorl", "base")], 1)[0], "ann", {"overall": "tie"}, ["overall"])
    assert "1 answer line(s) were added after this summary" in "\n".join(human_lines(run))


def test_api_sends_no_method_names(run: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from emorl.judge.app import Session, create_app

    items = build_items(run, [("emorl", "uniform"), ("soups", "base")], 5)
    session = Session(items, criteria_for(evaluated(run)), "ann", AnswerStore(run))
    client = TestClient(create_app(session))
    seen = [client.get("/").text, client.get("/static/judge.js").text, client.get("/api/session").text]
    choices = {c: "tie" for c in criteria_for(evaluated(run))}
    while True:
        r = client.get("/api/next")
        seen.append(r.text)
        item = r.json()["item"]
        if item is None:
            break
        r = client.post("/api/answer", json={"item": item["id"], "choices": choices})
        assert r.status_code == 200 and r.json()["saved"]
        seen.append(r.text)
    assert len(AnswerStore(run).read()) == len(items) == 10
    page = "\n".join(seen)
    for m in [*METHODS, *LABELS.values()]:
        assert m not in page, m  # not in the page's files, not in any answer the server sent
    bad = client.post("/api/answer", json={"item": items[0].id, "choices": {"overall": "left"}})
    assert bad.status_code == 400 and "one choice for each criterion" in bad.json()["error"]
    assert client.post("/api/answer", content=b"{not json").status_code == 400


def test_offline_page_keeps_a_reply_that_looks_like_markup_as_text() -> None:
    from emorl.judge.page import page_data, render_html
    from emorl.judge.store import Item

    evil = "</script><script>alert(1)</script><!-- x"
    item = Item("0" * 16, "emorl", "base", 0, 0, "hi </SCRIPT> there", "emorl", evil, "fine")
    html = render_html(page_data([item], ["overall"], "ann", "00" * 16))
    assert "alert(1)</script>" not in html and "<!-- x" not in html  # cannot close the data's <script>
    start = html.index("window.JUDGE_DATA = ") + len("window.JUDGE_DATA = ")
    data = json.loads(html[start:html.index(";</script>", start)].replace("<\\/", "</").replace("<\\!--", "<!--"))
    assert data["items"][0]["left"] == evil  # the text survives exactly


def test_methods_evaluated_on_different_prompts_are_refused(run: Path) -> None:
    path = run / "eval" / "replies" / "uniform.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[3]["prompt"] = "another statement"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EmorlError, match="evaluated on different prompts.*--methods emorl uniform --force"):
        build_items(run, [("emorl", "uniform")], None)

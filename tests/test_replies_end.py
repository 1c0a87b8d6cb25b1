"""Replies that end (issue 26 §7): bench/replies_end.py's quick mode runs to the end on a tiny run, its
arithmetic (ended within a limit, time interpolated in tokens), and the report's ended % column."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emorl.report.ended import COLUMN, EOS_COLUMN, ended_flags, ended_percent, with_ended
from emorl.utils import append_jsonl

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH / "replies_end.py"))


def test_ended_within_a_limit_from_one_long_decode(bench):
    # lengths include EOS; rows 0 and 2 ended (EOS at 5 and at 30), rows 1 and 3 ran to the limit of 40
    ids = np.zeros((4, 40), dtype=int)
    ids[0, 4], ids[2, 29] = 2, 2
    lengths = np.array([5, 40, 30, 40])
    ended = bench["ended_flags"](ids, lengths, {2})
    assert ended.tolist() == [True, False, True, False]
    # with stop strings a row that stopped before the limit ended too (a sentence end, not EOS)
    assert bench["ended_flags"](ids, np.array([5, 40, 30, 12]), {2}, 40).tolist() == [True, False, True, True]
    e24, n24 = bench["at_limit"](lengths, ended, 24)
    assert e24.tolist() == [True, False, False, False] and n24.tolist() == [5, 24, 24, 24]
    e40, n40 = bench["at_limit"](lengths, ended, 40)
    assert e40.tolist() == [True, False, True, False] and n40.tolist() == [5, 40, 30, 40]


def test_time_is_interpolated_in_tokens_between_two_measured_decodes(bench):
    f = bench["interpolate_seconds"]
    assert f(100, (100, 2.0), (300, 6.0)) == 2.0 and f(300, (100, 2.0), (300, 6.0)) == 6.0
    assert f(200, (100, 2.0), (300, 6.0)) == pytest.approx(4.0)
    assert f(50, (100, 2.0), (100, 2.5)) == 2.5  # every row ended below the low limit: one cost


def test_ended_percent_counts_replies_shorter_than_the_limit():
    assert ended_flags([5, 24, 10, 24], 24).tolist() == [1.0, 0.0, 1.0, 0.0]
    pct, ci = ended_percent([{"prompt": f"p{i}", "tokens": t} for i, t in enumerate([5, 24, 10, 24])], 24)
    assert pct == 50.0 and 0.0 <= ci[0] <= 50.0 <= ci[1] <= 100.0
    assert ended_percent([], 24) is None
    with pytest.raises(ValueError):
        ended_flags([1], 0)


def test_with_ended_adds_the_column_after_the_length(tmp_path):
    for name, tokens in {"base": [3, 8, 8, 8], "emorl": [2, 4, 6, 8]}.items():
        for i, t in enumerate(tokens):
            append_jsonl(tmp_path / "eval" / "replies" / f"{name}.jsonl", {"seed": 0, "prompt": f"p{i}", "tokens": t})
    results = {"generation": {"max_new_tokens": 8},
               "methods": {"base": {}, "emorl": {}, "logits": {"same_as": "emorl"}, "gdpo": {}}}
    cols = ["Method", "Length (tokens)", "Tokens/s"]
    rows = [[m, "1", "2"] for m in results["methods"]]
    cols2, rows2 = with_ended(tmp_path, results, (cols, rows))
    assert cols2 == ["Method", "Length (tokens)", COLUMN, EOS_COLUMN, "Tokens/s"]
    assert rows2[0][2].startswith("25 [0, ")  # base: 1 of 4 replies under 8 tokens (no finish stored: EOS)
    assert rows2[0][3] == rows2[0][2]
    assert rows2[1][2].startswith("75 [")  # emorl: 3 of 4 and rows2[2][2] == rows2[1][2] and rows2[3][2] == "–"


def test_replies_end_quick(script, tiny_study, tmp_path):
    out = tmp_path / "end.json"
    printed = script("replies_end", "--quick", "--run", str(tiny_study), "--variants",
                     "two-sentences,one-sentence+stop", "--output", str(out))
    res = json.loads(out.read_text())
    assert res["split"] == "validation" and res["prompts"] == 4 and res["lengths"] == [4, 8]
    assert list(res["results"]) == ["two-sentences", "one-sentence+stop"]
    assert set(res["results"]["one-sentence+stop"]) == {"base", "emorl", "uniform"}
    for per_method in res["results"].values():
        for m in per_method.values():
            assert len(m["lengths"]) == 4 and all(1 <= n <= 8 for n in m["lengths"])
            assert 0.0 <= m["per_limit"]["4"]["ended"] <= m["per_limit"]["8"]["ended"] <= 1.0
    assert res["projection"]["two-sentences"]["4"]["minutes_ratios"] == {"search": 1.0, "evaluate": 1.0}
    assert "| two-sentences | 4 |" in printed
    # --merge decodes nothing: a variant measured twice is kept twice, the second as "NAME#2"
    merged = tmp_path / "merged.json"
    proc = subprocess.run([sys.executable, str(BENCH / "replies_end.py"), "--merge", str(out), str(out), "--output",
                           str(merged)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = json.loads(merged.read_text())
    assert list(both["results"]) == ["two-sentences", "one-sentence+stop", "two-sentences#2", "one-sentence+stop#2"]
    assert both["results"]["two-sentences#2"] == res["results"]["two-sentences"]
    assert "| two-sentences#2 | 8 |" in proc.stdout


def test_the_report_shows_ended_percent(tmp_path):
    from test_report import fake_run

    from emorl.report import write_report

    run, _ = fake_run(tmp_path)  # max_new_tokens 16; replies stored for two of its four methods
    for name, tokens in {"emorl": [4, 16, 9, 16], "base": [16, 16, 16, 16]}.items():
        for i, t in enumerate(tokens):
            append_jsonl(run / "eval" / "replies" / f"{name}.jsonl", {"seed": 0, "prompt": f"p{i}", "tokens": t})
    lines: dict[str, str] = {}
    for ln in write_report(run).read_text().splitlines():  # the comparison table is the first with these rows
        if ln.startswith("| ") and "|" in ln[2:]:
            lines.setdefault(ln.split("|")[1].strip(), ln)
    head = [c.strip() for c in lines["Method"].split("|")]
    col = head.index(COLUMN)
    assert head[col - 1] == "Length (tokens)"
    assert lines["EMORL"].split("|")[col].strip().startswith("50 [")
    assert lines["Base model"].split("|")[col].strip() == "0 [0, 0]"
    assert lines["Uniform Weighted"].split("|")[col].strip() == "–"  # no stored replies

"""The report's section on the blind human A/B evaluation: ``RUN/judge/summary.json`` (written by
``emorl judge --score``) as a table. Read from the file, so the report needs no judge code; absent, no section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emorl.report.tables import markdown


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def human_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = ["Pair (A vs B)", "Criterion", "Answers A/tie/B", "Prompts A/tie/B", "A win rate [95% CI]", "Sign test p",
            "Holm p", "Verdict"]
    rows = []
    for pair in summary.get("pairs", []):
        for crit, r in pair["criteria"].items():
            u = r["prompts"]
            rate = f"{r['win_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("decided") else "–"
            word = {"a": f"{pair['label_a']} preferred", "b": f"{pair['label_b']} preferred"}.get(r["verdict"],
                                                                                                  "unresolved")
            rows.append([f"{pair['label_a']} vs {pair['label_b']}", crit, f"{r['wins']}/{r['ties']}/{r['losses']}",
                         f"{u['wins']}/{u['ties']}/{u['losses']}", rate, _p(r["p"]), _p(r["p_holm"]), word])
    return cols, rows


def human_lines(run: str | Path) -> list[str]:
    """Markdown lines for the report ([] when nobody's answers were scored); notes answers given since."""
    folder = Path(run) / "judge"
    path = folder / "summary.json"
    if not path.exists():
        return []
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return ["## Blind human A/B evaluation", "", f"`judge/summary.json` could not be read ({e}); run "
                f"`emorl judge --run {run} --score` again.", ""]
    answers = folder / "answers.jsonl"
    given = sum(1 for line in answers.read_text(encoding="utf-8").splitlines() if line.strip()) \
        if answers.exists() else 0
    raters = summary.get("raters", [])
    lines = ["## Blind human A/B evaluation", "", markdown(*human_rows(summary)), "",
             f"{summary.get('answers', 0)} answers from {len(raters)} rater(s), scored {summary.get('scored', '?')}. "
             "People compared two methods' replies to the same prompt and seed without knowing which method wrote "
             "which (random sides and order). Each prompt counts once, for the side most of its answers preferred (a "
             "tie when level), so several raters of one prompt do not count as independent evidence. *A win rate*: "
             "A's prompts ÷ decided prompts (ties dropped), with a Wilson 95% interval; *Sign test p*: exact "
             "two-sided binomial test of A's prompts against B's; *Holm p*: adjusted over every row of this table. "
             "A verdict needs Holm p < 0.05; otherwise the comparison is unresolved.",
             ""]
    if given > summary.get("answers", 0):
        lines += [f"*{given - summary.get('answers', 0)} answer line(s) were added after this summary; run "
                  f"`emorl judge --run {run} --score` to include them.*", ""]
    return lines

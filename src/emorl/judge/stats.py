"""The statistics of a blind A/B evaluation: wins, ties and losses per pair and criterion, an exact two-sided sign
test over prompts (the independent unit; ties dropped: under "no preference" each decided prompt is a fair coin),
a Wilson 95% interval for the win rate among decided prompts, and Holm's correction over every test of the
summary (many pairs x criteria).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emorl.utils import EmorlError, atomic_write_json

SUMMARY_VERSION = 1
LEVEL = 0.95
ALPHA = 0.05


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins against losses at p = 1/2 (ties already dropped); 1.0 with none."""
    n = wins + losses
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson score interval for a proportion k/n (Wilson 1927); None when n = 0. It stays inside [0, 1] and keeps
    its coverage near the nominal level for small n and rates near 0 or 1, where the normal interval does not."""
    if n == 0:
        return None
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over all the tests), in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def dedupe(answers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One answer per (rater, item): the first (the store never writes a second; an import might)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in answers:
        key = (str(r.get("rater")), str(r.get("item")))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def tally(answers: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(a, b) -> criterion -> {"wins", "ties", "losses"} over answers, counted for a, and "net": prompt -> wins
    minus losses of that prompt's answers (several raters, or seeds, judge one prompt). A pair asked both ways
    (b:a) is counted in the orientation first seen."""
    out: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in answers:
        a, b = r["a"], r["b"]
        flip = (b, a) in out and (a, b) not in out
        key = (b, a) if flip else (a, b)
        unit = r.get("prompt_index", r["item"])  # hand-made answers without one: each is its own unit
        per = out.setdefault(key, {})
        for crit, v in r["verdicts"].items():
            c = per.setdefault(crit, {"wins": 0, "ties": 0, "losses": 0, "net": {}})
            step = 0 if v == "tie" else (1 if (v == "a") != flip else -1)
            c[{0: "ties", 1: "wins", -1: "losses"}[step]] += 1
            c["net"][unit] = c["net"].get(unit, 0) + step
    return out


def summarise(answers: list[dict[str, Any]], labels: dict[str, str] | None = None,
              order: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Every pair and criterion: counts over answers, and the test over prompts (the independent unit: a prompt
    goes to the side most of its answers preferred, a tie when level; with one answer per prompt the two agree):
    the win rate of a among decided prompts with its Wilson interval, the sign test's p and Holm's adjusted p; the
    verdict says which side is preferred at Holm p < 0.05, else unresolved. Pairs in ``order`` (as the user listed
    them) come first, the others as first answered."""
    answers = dedupe(answers)
    if not answers:
        raise EmorlError("no answers to score yet: judge some pairs first (`emorl judge --run RUN --pairs A:B`)")
    labels = labels or {}
    counts = tally(answers)
    rank: dict[tuple[str, str], int] = {}
    for p in order or []:
        rank.setdefault(p, len(rank))
    counts = dict(sorted(counts.items(), key=lambda kv: rank.get(kv[0], len(rank))))  # stable: first answered next
    rows = []
    for (a, b), per in counts.items():
        for crit, c in per.items():
            nets = list(c["net"].values())
            units = {"wins": sum(x > 0 for x in nets), "ties": sum(x == 0 for x in nets),
                     "losses": sum(x < 0 for x in nets)}
            decided = units["wins"] + units["losses"]
            ci = wilson(units["wins"], decided)
            rows.append({"a": a, "b": b, "criterion": crit, "wins": c["wins"], "ties": c["ties"],
                         "losses": c["losses"], "n": c["wins"] + c["ties"] + c["losses"], "prompts": units,
                         "decided": decided, "win_rate": units["wins"] / decided if decided else None,
                         "ci95": list(ci) if ci else None, "p": sign_test(units["wins"], units["losses"])})
    for row, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adj
        wins, losses = row["prompts"]["wins"], row["prompts"]["losses"]
        row["verdict"] = ("a" if wins > losses else "b") if adj < ALPHA else "unresolved"
    pairs: list[dict[str, Any]] = []
    for a, b in counts:
        pairs.append({"a": a, "b": b, "label_a": labels.get(a, a), "label_b": labels.get(b, b),
                      "criteria": {r["criterion"]: {k: v for k, v in r.items() if k not in ("a", "b", "criterion")}
                                   for r in rows if (r["a"], r["b"]) == (a, b)}})
    return {"version": SUMMARY_VERSION, "scored": time.strftime("%Y-%m-%dT%H:%M:%S"), "answers": len(answers),
            "raters": sorted({str(r.get("rater")) for r in answers}), "level": LEVEL, "alpha": ALPHA,
            "unit": "prompt: the side most of its answers preferred (a tie when level)",
            "test": "exact two-sided sign test (binomial, p = 1/2) over prompts, ties dropped; Holm-adjusted over "
                    "all rows",
            "interval": "Wilson score interval for the win rate of A among decided (non-tie) prompts",
            "pairs": pairs}


def write_summary(run: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(run) / "judge" / "summary.json"
    atomic_write_json(path, summary)
    return path


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain text, one block per pair."""
    lines = [f"{summary['answers']} answers from {len(summary['raters'])} rater(s): {', '.join(summary['raters'])}"]
    for pair in summary["pairs"]:
        a, b = pair["a"], pair["b"]
        lines += ["", f"{a} (A: {pair['label_a']}) vs {b} (B: {pair['label_b']})",
                  f"  {'criterion':<12} {'answers A/tie/B':>15} {'prompts A/tie/B':>15}  {'A win rate [95% CI]':<20} "
                  f"{'p':>7} {'Holm p':>7}  verdict"]
        for crit, r in pair["criteria"].items():
            u = r["prompts"]
            rate = (f"{r['win_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["decided"] else "–")
            word = {"a": f"{a} preferred", "b": f"{b} preferred"}.get(r["verdict"], "unresolved")
            given, units = f"{r['wins']}/{r['ties']}/{r['losses']}", f"{u['wins']}/{u['ties']}/{u['losses']}"
            lines.append(f"  {crit:<12} {given:>15} {units:>15}  {rate:<20} {fmt_p(r['p']):>7} "
                         f"{fmt_p(r['p_holm']):>7}  {word}")
    lines += ["", "Each prompt counts once: for the side most of its answers preferred (a tie when level). Win rate: "
              "A's prompts / decided prompts, ties dropped, with a Wilson 95% interval; p: exact two-sided sign test "
              "over prompts; Holm p: adjusted over every row; a verdict needs Holm p < 0.05."]
    return "\n".join(lines)

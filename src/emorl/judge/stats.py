"""The statistics of a blind A/B evaluation: wins, ties and losses per pair and criterion, an exact two-sided sign
test (ties dropped: under "no preference" each decided answer is a fair coin), a Wilson 95% interval for the win
rate among decided answers, and Holm's correction over every test of the summary (many pairs x criteria).
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


def tally(answers: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, int]]]:
    """(a, b) -> criterion -> {"wins", "ties", "losses"} counted for a. A pair asked both ways (b:a) is counted in
    the orientation first seen."""
    out: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for r in answers:
        a, b = r["a"], r["b"]
        flip = (b, a) in out and (a, b) not in out
        key = (b, a) if flip else (a, b)
        per = out.setdefault(key, {})
        for crit, v in r["verdicts"].items():
            c = per.setdefault(crit, {"wins": 0, "ties": 0, "losses": 0})
            if v == "tie":
                c["ties"] += 1
            elif (v == "a") != flip:
                c["wins"] += 1
            else:
                c["losses"] += 1
    return out


def summarise(answers: list[dict[str, Any]], labels: dict[str, str] | None = None,
              order: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Every pair and criterion: counts, win rate of a among decided answers with its Wilson interval, the sign
    test's p and Holm's adjusted p; the verdict says which side is preferred at Holm p < 0.05, else unresolved.
    Pairs in ``order`` (as the user listed them) come first, the others as first answered."""
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
            decided = c["wins"] + c["losses"]
            ci = wilson(c["wins"], decided)
            rows.append({"a": a, "b": b, "criterion": crit, **c, "n": decided + c["ties"], "decided": decided,
                         "win_rate": c["wins"] / decided if decided else None,
                         "ci95": list(ci) if ci else None, "p": sign_test(c["wins"], c["losses"])})
    for row, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adj
        row["verdict"] = ("a" if row["wins"] > row["losses"] else "b") if adj < ALPHA else "unresolved"
    pairs: list[dict[str, Any]] = []
    for a, b in counts:
        pairs.append({"a": a, "b": b, "label_a": labels.get(a, a), "label_b": labels.get(b, b),
                      "criteria": {r["criterion"]: {k: v for k, v in r.items() if k not in ("a", "b", "criterion")}
                                   for r in rows if (r["a"], r["b"]) == (a, b)}})
    return {"version": SUMMARY_VERSION, "scored": time.strftime("%Y-%m-%dT%H:%M:%S"), "answers": len(answers),
            "raters": sorted({str(r.get("rater")) for r in answers}), "level": LEVEL, "alpha": ALPHA,
            "test": "exact two-sided sign test (binomial, p = 1/2), ties dropped; Holm-adjusted over all rows",
            "interval": "Wilson score interval for the win rate of A among decided (non-tie) answers",
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
                  f"  {'criterion':<12} {'A wins':>6} {'ties':>5} {'B wins':>6}  {'A win rate [95% CI]':<22} "
                  f"{'p':>7} {'Holm p':>7}  verdict"]
        for crit, r in pair["criteria"].items():
            rate = (f"{r['win_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["decided"] else "–")
            word = {"a": f"{a} preferred", "b": f"{b} preferred"}.get(r["verdict"], "unresolved")
            lines.append(f"  {crit:<12} {r['wins']:>6} {r['ties']:>5} {r['losses']:>6}  {rate:<22} "
                         f"{fmt_p(r['p']):>7} {fmt_p(r['p_holm']):>7}  {word}")
    lines += ["", "Win rate: A's wins / (A's wins + B's wins), ties dropped; p: exact two-sided sign test; Holm p: "
              "adjusted over every row; a verdict needs Holm p < 0.05."]
    return "\n".join(lines)

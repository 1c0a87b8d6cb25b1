"""Ended %: the share of a method's replies that ended with EOS before the token limit (issue 26 §7).

A reply cut at ``max_new_tokens`` is a fragment the rewards still score, so the report says per method how many
replies ended on their own. It is read from the stored replies' token counts (``RUN/eval/replies/<method>.jsonl``,
EOS included in the count): a reply ended when it has fewer tokens than the limit. One that put EOS exactly as its
last allowed token counts as cut, so the share is a slight undercount.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emorl.stats import bootstrap_ci
from emorl.utils import read_jsonl

COLUMN = "Ended % (EOS)"
AFTER = "Length (tokens)"


def ended_flags(tokens: Sequence[int], max_new_tokens: int) -> np.ndarray:
    """1.0 per reply with fewer tokens than ``max_new_tokens`` (it ended with EOS), else 0.0."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return (np.asarray(tokens, dtype=int) < max_new_tokens).astype(float)


def ended_percent(rows: Sequence[dict[str, Any]], max_new_tokens: int) -> tuple[float, list[float]] | None:
    """(ended %, its 95% CI resampling prompts) of one method's stored replies, or None without replies."""
    rows = [r for r in rows if "tokens" in r]
    if not rows:
        return None
    flags = ended_flags([int(r["tokens"]) for r in rows], max_new_tokens)
    lo, hi = bootstrap_ci(flags, clusters=[r.get("prompt", i) for i, r in enumerate(rows)])
    return 100 * float(flags.mean()), [100 * lo, 100 * hi]


def fmt_ended(value: tuple[float, list[float]] | None) -> str:
    return "–" if value is None else f"{value[0]:.0f} [{value[1][0]:.0f}, {value[1][1]:.0f}]"


def with_ended(run: str | Path, results: dict[str, Any],
               table: tuple[list[str], list[list[str]]]) -> tuple[list[str], list[list[str]]]:
    """``table`` (the comparison table, one row per method in ``results["methods"]`` order) with the ended %
    column after the length; a method decoded once for its twin (``same_as``) reads the twin's replies."""
    columns, rows = table
    limit = (results.get("generation") or {}).get("max_new_tokens")
    if not limit:
        return table
    where = columns.index(AFTER) + 1 if AFTER in columns else len(columns)
    folder = Path(run) / "eval" / "replies"
    cells = []
    for name, m in results["methods"].items():
        path = folder / f"{m.get('same_as') or name}.jsonl"
        cells.append(fmt_ended(ended_percent(read_jsonl(path), int(limit)) if path.exists() else None))
    return ([*columns[:where], COLUMN, *columns[where:]],
            [[*r[:where], c, *r[where:]] for r, c in zip(rows, cells, strict=True)])

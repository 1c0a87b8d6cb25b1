"""Ended %: the share of a method's replies that ended on their own before the token limit (issue 26 §7).

A reply cut at ``max_new_tokens`` is a fragment the rewards still score, so the report says per method how many
replies ended, as two numbers: **ended** (EOS or a ``generation.stop`` string, e.g. the first sentence end) and
**EOS** alone (the model chose to stop; with stop strings, only a reply that ended before any sentence end). Each
stored reply (``RUN/eval/replies/<method>.jsonl``) records how it ended (``finish``: "eos", "stop" or "length",
from the decoder), so the count is exact. Replies stored before that was recorded are read from their token
counts (EOS included): fewer tokens than the limit = EOS; one whose EOS was its last allowed token counts as cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emorl.stats import bootstrap_ci
from emorl.utils import read_jsonl

COLUMN = "Ended % (EOS or stop)"
EOS_COLUMN = "EOS %"
AFTER = "Length (tokens)"
REASONS = ("eos", "stop", "length")


def ended_flags(tokens: Sequence[int], max_new_tokens: int) -> np.ndarray:
    """1.0 per reply with fewer tokens than ``max_new_tokens`` (it ended before the limit), else 0.0."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return (np.asarray(tokens, dtype=int) < max_new_tokens).astype(float)


def finish_of(row: dict[str, Any], max_new_tokens: int) -> str:
    """How one stored reply ended: its recorded ``finish``, or (an older file) "eos" when it has fewer tokens than
    the limit, else "length"."""
    if "finish" in row:
        if row["finish"] not in REASONS:
            raise ValueError(f"finish must be one of {', '.join(REASONS)}, got {row['finish']!r}")
        return str(row["finish"])
    return "eos" if ended_flags([int(row["tokens"])], max_new_tokens)[0] else "length"


def ended_percent(rows: Sequence[dict[str, Any]], max_new_tokens: int, reasons: tuple[str, ...] = ("eos", "stop")
                  ) -> tuple[float, list[float]] | None:
    """(% of one method's stored replies whose finish is in ``reasons``, its 95% CI resampling prompts), or None
    without replies. Default: ended (EOS or a stop string); ``reasons=("eos",)``: EOS alone."""
    rows = [r for r in rows if "tokens" in r or "finish" in r]
    if not rows:
        return None
    flags = np.array([finish_of(r, max_new_tokens) in reasons for r in rows], dtype=float)
    lo, hi = bootstrap_ci(flags, clusters=[r.get("prompt", i) for i, r in enumerate(rows)])
    return 100 * float(flags.mean()), [100 * lo, 100 * hi]


def fmt_ended(value: tuple[float, list[float]] | None) -> str:
    return "–" if value is None else f"{value[0]:.0f} [{value[1][0]:.0f}, {value[1][1]:.0f}]"


def with_ended(run: str | Path, results: dict[str, Any],
               table: tuple[list[str], list[list[str]]]) -> tuple[list[str], list[list[str]]]:
    """``table`` (the comparison table, one row per method in ``results["methods"]`` order) with the ended % and
    EOS % columns after the length; a method decoded once for its twin (``same_as``) reads the twin's replies."""
    columns, rows = table
    limit = (results.get("generation") or {}).get("max_new_tokens")
    if not limit:
        return table
    where = columns.index(AFTER) + 1 if AFTER in columns else len(columns)
    folder = Path(run) / "eval" / "replies"
    cells = []
    for name, m in results["methods"].items():
        path = folder / f"{m.get('same_as') or name}.jsonl"
        replies = read_jsonl(path) if path.exists() else []
        cells.append([fmt_ended(ended_percent(replies, int(limit))),
                      fmt_ended(ended_percent(replies, int(limit), ("eos",)))])
    return ([*columns[:where], COLUMN, EOS_COLUMN, *columns[where:]],
            [[*r[:where], *c, *r[where:]] for r, c in zip(rows, cells, strict=True)])

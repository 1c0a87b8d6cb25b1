"""Two example rewards for examples/own-model.yaml. A reward is a plain function: prompts and replies in, one score
in [0, 1] per reply out (TRL's `fn(prompts, completions, **kwargs)` signature works too). Keyword arguments come
from the objective's `kwargs` in the YAML."""

from __future__ import annotations

import re

WARM = {"sorry", "understand", "hear", "sounds", "must", "feel", "here", "help", "together", "makes sense", "hard",
        "tough", "glad", "thank"}


def warmth(prompts: list[str], replies: list[str]) -> list[float]:
    """The share of WARM's words a reply uses, saturating at 3 of them."""
    return [min(1.0, sum(w in r.lower() for w in WARM) / 3) for r in replies]


def brevity(prompts: list[str], replies: list[str], words: int = 25) -> list[float]:
    """1 for a reply of at most `words` words, falling linearly to 0 at twice that; 0 for an empty reply."""
    scores = []
    for r in replies:
        n = len(re.findall(r"\w+", r))
        scores.append(0.0 if n == 0 else max(0.0, min(1.0, 2 - n / words)))
    return scores

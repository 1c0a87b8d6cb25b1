"""Reply metrics of the evaluation: Diversity-2 (corpus-level and the reference's per-reply variant), lengths,
per-objective means, and mean ± std over seeds."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np


def words(text: str) -> list[str]:
    """Whitespace tokens, as the reference's diversity scorer splits (no lower-casing, punctuation kept)."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct word n-grams ÷ all word n-grams over all ``texts`` together (0 when there are none).

    Corpus level, as in Li et al. (2016) "A Diversity-Promoting Objective": a method that gives every
    prompt the same reply scores low even if each reply is internally varied."""
    counts: Counter[tuple[str, ...]] = Counter()
    for t in texts:
        counts.update(ngrams(words(t), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def diversity_reference(texts: Iterable[str], n: int = 2) -> float:
    """The reference code's Diversity-2: mean over replies of |distinct word n-grams| ÷ |words| (0 for an
    empty reply). It divides by words, not n-grams, so a reply of m distinct words scores (m − 1)/m."""
    vals = []
    for t in texts:
        w = words(t)
        vals.append(len(set(ngrams(w, n))) / len(w) if w else 0.0)
    return float(np.mean(vals)) if vals else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of per-seed values; std is 0 for one value.

    ddof = 1 because the seeds are a sample of the decoding noise, and the paper's "mean ± std over seeds"
    is an error bar on that noise."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def reply_metrics(prompts: Sequence[str], replies: Sequence[str], scores: dict[str, np.ndarray],
                  token_lengths: Sequence[int]) -> dict[str, float]:
    """Metrics of one decode (one method, one seed): each objective's mean, their mean (the paper's "mean
    reward"), Diversity-2 (both variants), mean reply length in tokens and in words."""
    if len(prompts) != len(replies) or len(token_lengths) != len(replies):
        raise ValueError(f"{len(prompts)} prompts, {len(replies)} replies, {len(token_lengths)} lengths")
    out = {f"score/{o}": float(np.mean(s)) for o, s in scores.items()}
    out["mean_reward"] = float(np.mean([out[f"score/{o}"] for o in scores])) if scores else math.nan
    out["diversity2"] = distinct_n(replies, 2)
    out["diversity2_ref"] = diversity_reference(replies, 2)
    out["length_tokens"] = float(np.mean(token_lengths)) if len(token_lengths) else 0.0
    out["length_words"] = float(np.mean([len(words(r)) for r in replies])) if replies else 0.0
    return out


def summarise(per_seed: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean": m, "std": s, "n": n}} over the per-seed metric dicts."""
    keys = list(dict.fromkeys(k for d in per_seed for k in d))
    out = {}
    for k in keys:
        m, s = mean_std([d[k] for d in per_seed if k in d])
        out[k] = {"mean": m, "std": s, "n": sum(k in d for d in per_seed)}
    return out


# ------------------------------------------------------------------------------------------- methods


def scored_seed(seed: int, prompts: Sequence[str], replies: Sequence[str], token_lengths: Sequence[int],
                seconds: float, scores: dict[str, np.ndarray], finish: Sequence[str] | None = None
                ) -> tuple[dict[str, float], list[dict]]:
    """One method's decode for one seed, scored: its ``per_seed`` entry (:func:`reply_metrics`, decode seconds and
    tokens/s) and its rows of RUN/eval/replies/METHOD.jsonl (how each reply ended, when the decoder said)."""
    m = {"seed": seed, **reply_metrics(prompts, replies, scores, token_lengths), "decode_s": seconds}
    m["tokens_per_s"] = sum(token_lengths) / seconds if seconds > 0 else math.nan
    rows = [{"seed": seed, "prompt": p, "reply": t, "tokens": token_lengths[i],
             **({"finish": finish[i]} if finish else {}), "scores": {o: float(s[i]) for o, s in scores.items()}}
            for i, (p, t) in enumerate(zip(prompts, replies, strict=True))]
    return m, rows

"""Confidence intervals of an evaluation: every per-reply metric's 95% CI and each method's paired difference to
EMORL and to Uniform Weighted, from a bootstrap that resamples prompts (each with all its seeds).

Every method is decoded on the same prompts with the same seeds (``RUN/eval/replies/<method>.jsonl``, one row per
reply), so the unit (seed, position of the prompt) is shared and the comparison is paired: a resample draws the same
prompts for every method. A prompt's seeds are correlated, so they are resampled together (a cluster bootstrap;
with one seed it is the plain bootstrap over prompts). Corpus-level metrics (Diversity-2) have no per-reply value
and keep their mean ± std over seeds only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emorl.stats import RESAMPLES, bootstrap_ci, paired_difference

REFERENCES = ("emorl", "uniform", "base")  # every method's difference to these is stored
SENTENCES = ("emorl", "uniform")  # ...and said in words (the base: in the report's improvement table)
BOOTSTRAP_SEED = 0


def unit_scores(reply_file: Path, objectives: list[str], judges: list[str] | None = None
                ) -> dict[str, np.ndarray] | None:
    """Per-unit values of one method's replies, in (seed, prompt) order: ``score/<o>``, ``mean_reward`` (the mean
    of the objectives of one reply) and ``length_tokens``; None when the reply file is missing or incomplete."""
    if not reply_file.exists():
        return None
    rows = [json.loads(line) for line in reply_file.read_text().splitlines() if line.strip()]
    if not rows or any(set(objectives) - set(r.get("scores", {})) for r in rows):
        return None
    rows.sort(key=lambda r: r["seed"])  # stable: prompts stay in their order within a seed
    out = {f"score/{o}": np.array([r["scores"][o] for r in rows], float) for o in objectives}
    out["mean_reward"] = np.mean([out[f"score/{o}"] for o in objectives], axis=0)
    out["length_tokens"] = np.array([r.get("tokens", np.nan) for r in rows], float)
    if judges:  # held-out judges (emorl.judges): NaN where a reply was not judged, so it gets no CI
        for j in judges:
            out[f"judge/{j}"] = np.array([r.get("judges", {}).get(j, np.nan) for r in rows], float)
        out["judge_mean"] = np.mean([out[f"judge/{j}"] for j in judges], axis=0)
    return out


def add_confidence(run: Path, results: dict[str, Any], *, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Add ``summary.<metric>.ci95`` to every method and ``differences[<ref>][<metric>] = {mean, ci95, resolved}``
    (method − ref) for the references present; ``results["bootstrap"]`` records how. Returns ``results``."""
    objectives = list(results["objectives"])
    judges = list(results.get("judges") or [])
    units = {name: unit_scores(run / "eval" / "replies" / f"{m.get('same_as') or name}.jsonl", objectives, judges)
             for name, m in results["methods"].items()}  # a method decoded once for two names: its twin's replies
    n_units = {name: len(u["mean_reward"]) for name, u in units.items() if u is not None}
    expected = results["prompts"] * len(results["seeds"])
    prompts = np.tile(np.arange(results["prompts"]), len(results["seeds"]))  # the cluster of each (seed, prompt) unit
    for name, m in results["methods"].items():
        u = units[name]
        m.pop("differences", None)
        if u is None or n_units[name] != expected:
            units[name] = None
            continue
        for metric, values in u.items():
            if metric in m["summary"] and np.all(np.isfinite(values)):
                m["summary"][metric]["ci95"] = bootstrap_ci(values, clusters=prompts, resamples=resamples,
                                                            seed=seed)
    for name, m in results["methods"].items():
        if units[name] is None:
            continue
        diffs = {}
        for ref in REFERENCES:
            if ref == name or units.get(ref) is None:
                continue
            diffs[ref] = {metric: paired_difference(units[name][metric], units[ref][metric], clusters=prompts,
                                                    resamples=resamples, seed=seed)
                          for metric in ["mean_reward", *(f"score/{o}" for o in objectives),
                                         *(["judge_mean", *(f"judge/{j}" for j in judges)] if judges else [])]
                          if np.all(np.isfinite(units[name][metric])) and np.all(np.isfinite(units[ref][metric]))}
        if diffs:
            m["differences"] = diffs
    results["bootstrap"] = {"units": "(prompt, seed)", "n_units": expected, "resamples": resamples, "seed": seed,
                            "level": 0.95, "interval": "percentile", "paired": True, "resampled": "prompts",
                            "clusters": results["prompts"]}
    return results


def difference_sentences(results: dict[str, Any], metric: str = "mean_reward") -> list[str]:
    """One sentence per (method, reference) pair saying whether the difference in ``metric`` is resolved (its
    95% CI excludes 0) or not."""
    methods = results["methods"]
    out = []
    for ref in SENTENCES:
        if ref not in methods:
            continue
        resolved, unresolved = [], []
        for _name, m in methods.items():
            d = (m.get("differences") or {}).get(ref, {}).get(metric)
            if not d:
                continue
            lo, hi = d["ci95"]
            txt = f"{m['label']} {d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            (resolved if d["resolved"] else unresolved).append(txt)
        label = methods[ref]["label"]
        if resolved:
            out.append(f"Resolved differences to {label} (95% CI excludes 0): " + "; ".join(resolved) + ".")
        if unresolved:
            out.append(f"Not resolved against {label} (the CI holds 0, so these runs cannot tell them apart): "
                       + "; ".join(unresolved) + ".")
    return out

"""Held-out judges (``eval.judges``): rewards that score every method's stored test replies but that training, the
weight search and the router never see, so a method cannot have been fitted to them (Gao et al. 2023: a policy
optimised on a proxy improves the proxy; a separate judge tells whether it improved what the proxy stands for).

A judge is any reward spec (built like the objectives'). It reads ``RUN/eval/replies/<method>.jsonl``, adds
``"judges": {name: value}`` to every row and ``judge/<name>`` (plus ``judge_mean``, their mean) to every method's
per-seed metrics; :func:`emorl.evaluate_stats.add_confidence` then gives them CIs and paired differences like the
objectives. A pairwise judge (``llm-judge`` with ``mode: pairwise``) compares each reply with the reply of its
``reference`` method to the same prompt and seed. Judge scores are reused while the judges' specs are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from emorl.config import RunConfig
from emorl.metrics import summarise
from emorl.utils import EmorlError, atomic_write_text

log = logging.getLogger("emorl.judges")
NEEDS_BASE = ("fluency", "reflection-pmi")  # judge types that score under the run's base model


def judges_signature(specs: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_judges(cfg: RunConfig, methods: list[str]) -> None:
    """Before any decoding: judge names must not shadow objectives, and a pairwise judge's reference method must be
    among the methods evaluated."""
    for name, spec in cfg.eval.judges.items():
        if name in cfg.objectives:
            raise EmorlError(f"eval.judges.{name}: a judge may not share its name with an objective (the training "
                             f"reward of that name); rename it, e.g. {name}_judge")
        if not isinstance(spec, dict) or "type" not in spec:
            raise EmorlError(f"eval.judges.{name}: a judge is a reward spec with a 'type' (e.g. {{type: llm-judge, "
                             f"base_url: ..., model: ...}})")
        ref = spec.get("reference")
        if spec.get("mode") == "pairwise" and ref not in methods:
            raise EmorlError(f"eval.judges.{name}.reference: method {ref!r} is not among the methods evaluated "
                             f"({', '.join(methods)}); add it to eval.methods or pick one of them")


def build_judges(cfg: RunConfig, base: Any = None) -> dict[str, Any]:
    """The judges' reward objects (the base model is loaded only when a judge type needs it)."""
    from emorl.rewards import build_rewards

    specs = cfg.eval.judges
    if base is None and any(s.get("type") in NEEDS_BASE for s in specs.values()):
        from emorl.models import load_base

        base = load_base(cfg.model)
    return build_rewards(specs, base, section="eval.judges")


def _reply_file(run: Path, name: str, m: dict[str, Any]) -> Path:
    return run / "eval" / "replies" / f"{m.get('same_as') or name}.jsonl"


def _by_seed(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(int(r["seed"]), []).append(r)
    return out


def judge_rows(judges: dict[str, Any], rows: list[dict[str, Any]], ref_rows: dict[str, list[dict[str, Any]]],
               method: str) -> None:
    """Score ``rows`` (one method's replies, one seed) with every judge, in place (``row["judges"]``).
    ``ref_rows``: reference method -> its rows of the same seed, for pairwise judges."""
    from emorl.rewards import score

    prompts = [r["prompt"] for r in rows]
    replies = [r["reply"] for r in rows]
    for name, judge in judges.items():
        ref = getattr(judge, "reference", None)
        if getattr(judge, "mode", None) == "pairwise" and ref:
            other = ref_rows.get(ref)
            if other is None or [r["prompt"] for r in other] != prompts:
                raise EmorlError(f"eval.judges.{name}: the replies of reference method {ref!r} do not match those "
                                 f"of {method!r} (prompts or seeds differ); evaluate both together")
            values = np.clip(judge.compare(prompts, replies, [r["reply"] for r in other]), 0.0, 1.0)
        else:
            values = score(judge, prompts, replies)
        for r, v in zip(rows, values, strict=True):
            r.setdefault("judges", {})[name] = float(v)


def add_judges(run: str | Path, results: dict[str, Any], cfg: RunConfig, base: Any = None,
               judges: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every method's stored replies with ``cfg.eval.judges`` (reusing scores made under the same specs) and
    put ``judge/<name>`` and ``judge_mean`` into each method's per-seed metrics and summary. Returns ``results``."""
    run = Path(run)
    specs = cfg.eval.judges
    methods = results["methods"]
    if not specs:
        results.pop("judges", None)
        for m in methods.values():
            _strip(m)
        return results
    check_judges(cfg, list(methods))
    sig = judges_signature(specs)
    names = list(specs)
    results["judges"] = names
    results["judge_specs"] = {n: {k: v for k, v in s.items() if "key" not in k} for n, s in specs.items()}
    todo = [n for n, m in methods.items() if not m.get("same_as") and m.get("judges_signature") != sig]
    if todo:
        judges = judges if judges is not None else build_judges(cfg, base)
        files = {n: _reply_file(run, n, m) for n, m in methods.items()}
        rows = {n: _read(f) for n, f in files.items() if not methods[n].get("same_as")}
        for name in todo:
            log.info("judging %s with %s", name, ", ".join(names))
            by_seed = _by_seed(rows[name])
            for seed, seed_rows in by_seed.items():
                refs = {ref: _by_seed(rows[ref]).get(seed, []) for ref in
                        {getattr(j, "reference", None) for j in judges.values()} if ref in rows}
                judge_rows(judges, seed_rows, refs, name)
            atomic_write_text(files[name], "".join(json.dumps(r) + "\n" for r in rows[name]))
            _set_metrics(methods[name], by_seed, names)
            methods[name]["judges_signature"] = sig
    for m in methods.values():
        twin = m.get("same_as")
        if twin and twin in methods:  # decoded once for two names: the twin's judge scores
            m["per_seed"] = methods[twin]["per_seed"]
            m["summary"] = methods[twin]["summary"]
            m["judges_signature"] = sig
    return results


def _read(path: Path) -> list[dict[str, Any]]:
    from emorl.utils import read_jsonl

    rows = read_jsonl(path)
    if not rows:
        raise EmorlError(f"{path}: no replies to judge; evaluate the run again (`emorl evaluate --force`)")
    return rows


def _set_metrics(m: dict[str, Any], by_seed: dict[int, list[dict[str, Any]]], names: list[str]) -> None:
    for d in m["per_seed"]:
        _strip_seed(d)
        seed_rows = by_seed.get(int(d["seed"]), [])
        if not seed_rows:
            continue
        per = {j: float(np.mean([r["judges"][j] for r in seed_rows])) for j in names}
        d.update({f"judge/{j}": v for j, v in per.items()})
        d["judge_mean"] = float(np.mean(list(per.values())))
    m["summary"] = summarise([{k: v for k, v in d.items() if k != "seed"} for d in m["per_seed"]])


def _strip_seed(d: dict[str, Any]) -> None:
    for k in [k for k in d if k.startswith("judge/") or k == "judge_mean"]:
        del d[k]


def _strip(m: dict[str, Any]) -> None:
    """Drop judge metrics made under judges that are no longer configured."""
    if "judges_signature" not in m:
        return
    for d in m.get("per_seed", []):
        _strip_seed(d)
    for k in [k for k in m.get("summary", {}) if k.startswith("judge/") or k == "judge_mean"]:
        del m["summary"][k]
    del m["judges_signature"]

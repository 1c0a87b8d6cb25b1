"""Held-out prompt sets (``eval.extra_sets``): every evaluated method decoded on further prompts (a user's JSONL/CSV,
or the built-in ``chitchat-heldout`` set of :mod:`emorl.heldout_prompts`) with the evaluation's decoding and seeds,
scored by the objectives and the held-out judges, with the same paired (prompt-resampling) statistics, and reported
apart from the test split. Each set lives in ``RUN/eval/sets/<name>/`` (``results.json`` and ``eval/replies/``); a
method whose decode signature on the set is unchanged is reused, not decoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emorl.config import RunConfig
from emorl.methods import decoding_parts
from emorl.metrics import scored_seed, summarise
from emorl.utils import EmorlError, atomic_write_json, atomic_write_text

log = logging.getLogger("emorl.extra_sets")


def set_folder(run: Path, name: str) -> Path:
    return run / "eval" / "sets" / name


def check_sets(cfg: RunConfig, methods: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Every set's prompts (errors name the set and key), read before any decoding; a set's ``methods`` (a subset
    of the evaluated ``methods``) checked too."""
    from emorl.heldout_prompts import set_prompts

    for name, spec in cfg.eval.extra_sets.items():
        wanted = spec.get("methods") if isinstance(spec, dict) else None
        if wanted is None:
            continue
        if not isinstance(wanted, list) or not wanted or not all(isinstance(m, str) for m in wanted):
            raise EmorlError(f"eval.extra_sets.{name}.methods: expected a list of method names (e.g. [base, emorl, "
                             f"uniform]), or leave it out for every evaluated method; got {wanted!r}")
        known = set(methods or []) | set(cfg.eval.methods) | {f"single:{o}" for o in cfg.objectives}
        missing = [m for m in wanted if methods is not None and m not in known]
        if missing:
            raise EmorlError(f"eval.extra_sets.{name}.methods: {missing[0]!r} is not a method of this run "
                             f"(evaluated: {', '.join(methods or [])}); use one of eval.methods, or leave "
                             f"methods out for all")
    return {name: set_prompts(name, spec) for name, spec in cfg.eval.extra_sets.items()}


def set_methods(spec: dict[str, Any], specs: Sequence[Any]) -> list[Any]:
    """The evaluated methods a set decodes: those among its ``methods`` (in the evaluation's order), or all."""
    wanted = spec.get("methods")
    return [s for s in specs if wanted is None or s.name in wanted]


def _old(folder: Path) -> dict[str, Any]:
    p = folder / "results.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}  # a damaged file: the set is decoded again


def evaluate_extra_sets(run: str | Path, results: dict[str, Any], cfg: RunConfig, specs: Sequence[Any], *,
                        signature: Callable[..., str], base: Any = None, rewards: dict[str, Any] | None = None,
                        decode: Callable[..., Any] | None = None, base_adapter: dict[str, Path] | None = None,
                        prompts_by_set: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Evaluate ``specs`` on every set of ``cfg.eval.extra_sets``; ``results["extra_sets"][name]`` gets each set's
    per-method summary and paired differences. ``signature(spec, cfg, prompts, seeds)`` is the evaluation's
    decode signature. Returns ``results``."""
    from emorl.evaluate_stats import add_confidence
    from emorl.judges import add_judges

    run = Path(run)
    sets = prompts_by_set if prompts_by_set is not None else check_sets(cfg)
    if not sets:
        results.pop("extra_sets", None)
        return results
    seeds = list(results["seeds"])
    objectives = list(cfg.objectives)
    results["extra_sets"] = {}
    all_specs = specs
    for name, prompts in sets.items():
        specs = set_methods(cfg.eval.extra_sets[name], all_specs)
        folder = set_folder(run, name)
        old = _old(folder).get("methods", {})
        sigs = {s.name: signature(s, cfg, prompts, seeds) for s in specs}
        todo = [s for s in specs if old.get(s.name, {}).get("signature") != sigs[s.name]]
        res: dict[str, Any] = {
            "set": name, "spec": cfg.eval.extra_sets[name], "prompts": len(prompts),
            "prompts_sha256": hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16], "seeds": seeds,
            "objectives": objectives, "methods": {s.name: old[s.name] for s in specs if s not in todo}}
        if todo:
            base, rewards, decode = decoding_parts(cfg, base_adapter, base, rewards, decode)
            for s, decoded in decode(todo, prompts, seeds):
                log.info("extra set %s: %s", name, s.name)
                res["methods"][s.name] = _score_method(folder, s, sigs[s.name], decoded, prompts, rewards, objectives)
        res["methods"] = {s.name: res["methods"][s.name] for s in specs}
        add_judges(folder, res, cfg, base)
        add_confidence(folder, res)
        atomic_write_json(folder / "results.json", res)
        results["extra_sets"][name] = res
    return results


def _score_method(folder: Path, spec: Any, sig: str, decoded: list[Any], prompts: list[str],
                  rewards: dict[str, Any], objectives: list[str]) -> dict[str, Any]:
    from emorl.rewards import score

    per_seed, rows = [], []
    for seed, texts, lengths, seconds, *more in decoded:  # more: how each reply ended (report.ended)
        scores = {o: score(rewards[o], prompts, texts) for o in objectives}
        m, seed_rows = scored_seed(seed, prompts, texts, lengths, seconds, scores, more[0] if more else None)
        per_seed.append(m)
        rows += seed_rows
    atomic_write_text(folder / "eval" / "replies" / f"{spec.name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return {"label": spec.label, "kind": spec.kind, "signature": sig, "per_seed": per_seed,
            "summary": summarise([{k: v for k, v in d.items() if k != "seed"} for d in per_seed])}

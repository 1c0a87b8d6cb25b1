"""Evaluation: the metrics of the paper's comparison, and decoding every method on the test split.

Metrics (pure functions, pinned by hand-computed tests):

* :func:`distinct_n` — Diversity-n as defined by Li et al. (2016): distinct word n-grams ÷ all word n-grams,
  counted over every reply of a method together (corpus level).
* :func:`diversity_reference` — the EMORL reference code's variant: per reply, distinct word bigrams ÷ the
  number of *words* (not bigrams; at most (n−1)/n), averaged over replies, 0 for an empty reply. Kept so
  numbers can be compared with the paper's code; the two differ by construction.
* :func:`mean_std` — mean and sample standard deviation (ddof = 1; 0 for a single value) over seeds.

Methods (:data:`METHODS`): ``base`` (the untuned model, adapters disabled), ``emorl`` (hidden-state mixing
with the weights searched in ``RUN/search/hidden``), ``soups`` (parameter mixing, ``search/params``),
``logits`` (logit mixing, ``search/logits``), and the one-policy baselines ``uniform``, ``dynaopt`` and ``gdpo``
(``RUN/baselines/<name>``). Every method is decoded with the same :class:`~emorl.config.GenerationConfig`
and the same seeds on the same prompts: the reference code evaluated EMORL greedily but the baselines by
sampling, which confounds the comparison (spec §8.1). :func:`evaluate_run` writes ``RUN/eval/results.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emorl.config import RunConfig
from emorl.metrics import (  # noqa: F401 - re-exported: the evaluation's metrics
    distinct_n,
    diversity_reference,
    mean_std,
    ngrams,
    reply_metrics,
    summarise,
    words,
)
from emorl.utils import EmorlError, atomic_write_json

log = logging.getLogger("emorl.evaluate")

# method name -> (kind, search key). kind: base | adapter (one-policy baseline) | ensemble (searched mix). The search
# key names the mix (emorl.decoding.parse_mix): "hidden" follows search.anchor (default: base-anchored), "-convex"
# is the sum-1 form. The evaluation decodes each mix exactly as its search scored it (mode and anchor of best.json).
METHODS: dict[str, tuple[str, str | None]] = {
    "base": ("base", None),
    "uniform": ("adapter", None),
    "dynaopt": ("adapter", None),
    "gdpo": ("adapter", None),
    "fixed": ("adapter", None),
    "soups": ("ensemble", "params"),
    "soups-avg": ("ensemble", "params-convex"),
    "logits": ("ensemble", "logits"),
    "probs": ("ensemble", "probs"),
    "emorl": ("ensemble", "hidden"),
    "emorl-convex": ("ensemble", "hidden-convex"),
    "emorl-routed": ("routed", "hidden-convex"),  # per-prompt weights from RUN/router/ (emorl.router), convex
}
LABELS = {"base": "Base model", "uniform": "Uniform Weighted", "dynaopt": "DynaOpt", "gdpo": "GDPO",
          "fixed": "Fixed weights",
          "soups": "Model Soups (task arithmetic)", "soups-avg": "Model Soups (parameter average)",
          "logits": "Logit mixing", "probs": "Probability mixing", "emorl": "EMORL",
          "emorl-convex": "EMORL (convex mix)", "emorl-routed": "EMORL, routed weights"}
MODE_METHOD = {key: name for name, (kind, key) in METHODS.items() if key}
SINGLE = "single:"  # "single:<objective>": that objective's EMORL adapter alone; "singles" = one per objective
RESULTS_VERSION = 1
DECODER_VERSION = 4  # bump when the way methods are decoded changes: results made before are not reused


@dataclass
class MethodSpec:
    """What decoding one method needs: its adapters (name -> folder), and for a mix, the mode and weights."""

    name: str
    kind: str  # base | adapter | ensemble
    mode: str | None = None  # the mix's mode (hidden, logits, probs, params)
    adapters: dict[str, Path] = field(default_factory=dict)
    weights: list[float] | None = None
    search: dict[str, Any] | None = None  # the mode's best.json (ensemble methods)
    anchor: str = "base"  # the weight rule the search scored it with (ensemble methods)
    search_key: str | None = None  # RUN/search/<search_key>/
    router: Path | None = None  # routed methods: the run folder whose RUN/router/ picks per-prompt weights

    @property
    def label(self) -> str:
        return method_label(self.name)


def method_label(name: str) -> str:
    return f"{name.removeprefix(SINGLE)} adapter alone" if name.startswith(SINGLE) else LABELS.get(name, name)


def expand_methods(methods: Sequence[str], objectives: Sequence[str]) -> list[str]:
    """Check method names and expand ``singles`` to ``single:<objective>`` for every objective."""
    out: list[str] = []
    for m in methods:
        names = [f"{SINGLE}{o}" for o in objectives] if m == "singles" else [m]
        for n in names:
            if n not in METHODS and not (n.startswith(SINGLE) and n.removeprefix(SINGLE) in objectives):
                raise EmorlError(f"eval.methods: unknown method {n!r}; choose from {', '.join(METHODS)}, 'singles' "
                                 f"(each objective's adapter alone) or 'single:<objective>' with one of "
                                 f"{', '.join(objectives)}")
            if n in out:
                raise EmorlError(f"eval.methods: {list(methods)} lists {n!r} twice")
            out.append(n)
    return out


def method_kind(name: str) -> tuple[str, str | None]:
    """(kind, search mode) of a method name."""
    return ("adapter", None) if name.startswith(SINGLE) else METHODS[name]


def ensemble_objectives(cfg: RunConfig) -> list[str]:
    """The K objectives whose adapters EMORL mixes: every objective of the config, in config order.

    ``train.objectives`` is a per-call selection of ``emorl train`` (e.g. ``--objectives newobj`` to add one
    adapter); the ensemble always uses all of them, which is how a new objective joins an existing run."""
    return list(cfg.objectives)


def resolve_methods(run_dir: str | Path, cfg: RunConfig, methods: Sequence[str] | None = None) -> list[MethodSpec]:
    """Check that every method's inputs exist on disk (adapters, baselines, search results) before any model
    is loaded; the error names the missing file and the command that makes it."""
    from emorl.search.store import adapter_identity

    run = Path(run_dir)
    objectives = ensemble_objectives(cfg)
    methods = expand_methods(methods or cfg.eval.methods, objectives)
    specs = []
    for m in methods:
        kind, mode = method_kind(m)
        if kind == "base":
            specs.append(MethodSpec(m, kind))
        elif m.startswith(SINGLE):
            o = m.removeprefix(SINGLE)
            folder = run / "adapters" / o
            if not (folder / "adapter_model.safetensors").exists():
                raise EmorlError(f"method {m!r}: no adapter in {folder}. Train it with `emorl train --run {run} "
                                 f"--objectives {o}`")
            specs.append(MethodSpec(m, kind, adapters={o: folder}, weights=[1.0]))
        elif kind == "routed":
            from emorl.router.store import read_meta, router_dir

            read_meta(router_dir(run))  # missing or unknown version: the error names `emorl route`
            specs.append(MethodSpec(m, kind, "hidden", {o: run / "adapters" / o for o in objectives}, anchor="none",
                                    router=run))
        elif kind == "adapter":
            folder = run / "baselines" / m
            if not (folder / "adapter_model.safetensors").exists():
                raise EmorlError(f"method {m!r}: no trained baseline in {folder}. Train it with `emorl train --run "
                                 f"{run} --strategy {m}` (or `emorl run`), or drop it from --methods")
            specs.append(MethodSpec(m, kind, adapters={m: folder}, weights=[1.0]))
        else:
            from emorl.decoding import parse_mix

            folders = {o: run / "adapters" / o for o in objectives}
            missing = [o for o, f in folders.items() if not (f / "adapter_model.safetensors").exists()]
            if missing:
                raise EmorlError(f"method {m!r}: no adapter for objective(s) {', '.join(missing)} in "
                                 f"{run / 'adapters'}. Train them with `emorl train --run {run} --objectives "
                                 f"{','.join(missing)}`")
            key = str(mode)
            best_path = run / "search" / key / "best.json"
            if not best_path.exists():
                raise EmorlError(f"method {m!r}: {best_path} is missing. Search its weights first: `emorl search "
                                 f"--run {run} --mode {key}`")
            best = json.loads(best_path.read_text())
            if list(best.get("names", [])) != objectives:
                raise EmorlError(f"method {m!r}: {best_path} holds weights for {best.get('names')}, but the run's "
                                 f"objectives are {objectives}. Search again: `emorl search --run {run} --mode {key} "
                                 f"--fresh`")
            if "anchor" not in best:
                raise EmorlError(f"method {m!r}: {best_path} was written before the weight rule (anchor) was recorded, "
                                 f"so emorl cannot decode it as it was searched. Search again: `emorl search --run "
                                 f"{run} --mode {key} --fresh`")
            known = best.get("adapters", {})
            stale = [o for o, f in folders.items() if known.get(o) not in (None, adapter_identity(f))]
            if stale:
                raise EmorlError(f"method {m!r}: the adapters {stale} changed after {best_path} was written. Search "
                                 f"again: `emorl search --run {run} --mode {key} --fresh`")
            mix_mode, _ = parse_mix(key, cfg.search.anchor)
            anchor = str(best["anchor"])
            weights = [float(x) for x in best["weight_vector"]]
            if not any(weights) and anchor == "none":
                weights = best_decodable(best_path.parent, m)
            specs.append(MethodSpec(m, kind, mix_mode, folders, weights, best, anchor, key))
    return specs


def best_decodable(folder: Path, method: str) -> list[float]:
    """The best logged point other than the all-zero one. A search whose points all score the same (e.g. a
    random tiny model whose replies all score 0) may report w = 0, which cannot be decoded."""
    from emorl.utils import read_jsonl

    rows = [r for r in read_jsonl(folder / "points.jsonl")[1:] if any(r["weights"]) and r.get("aggregate") is not None]
    if not rows:
        raise EmorlError(f"method {method!r}: {folder} holds no decodable weight point (all zero); search again")
    best = max(rows, key=lambda r: r["aggregate"])  # first maximum in log order
    log.warning("%s: the best point of %s is all zero (every point scored the same?); using %s instead", method,
                folder, best["weights"])
    return [float(x) for x in best["weights"]]


def training_sessions(run_dir: Path) -> dict[str, tuple[str, float]]:
    """policy -> (training session, that session's wall time), from ``RUN/curves/<session>.json``.

    Policies trained together in one process (EMORL's K adapters, batched) share every step, so each one's own
    wall time is the session's time, not a K-th of it: the cost of the session is the longest policy's time."""
    out: dict[str, tuple[str, float]] = {}
    for f in sorted((run_dir / "curves").glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        longest = max((float(v.get("wall_time_s", 0.0)) for v in data.values()), default=0.0)
        for name in data:
            out[name] = (f.stem, longest)
    return out


def training_cost(spec: MethodSpec) -> dict[str, Any]:
    """Prompts consumed and wall time of the training behind a method: mixes count their K adapters (prompts:
    the sum; time: the sum over training sessions, K adapters trained together counting once), with per-adapter
    figures; the base model cost nothing."""
    from emorl.models import read_adapter_info

    per: dict[str, dict[str, Any]] = {}
    sessions: dict[str, float] = {}
    for name, folder in spec.adapters.items():
        info = read_adapter_info(folder)
        found = training_sessions(Path(folder).parent.parent).get(name)
        session, seconds = found if found else (f"own:{name}", info.wall_time_s)
        sessions[session] = max(sessions.get(session, 0.0), seconds)
        per[name] = {"prompts": info.prompts_consumed, "wall_time_s": info.wall_time_s, "steps": info.steps,
                     "converged": info.converged, "stop_reason": info.extra.get("stop_reason", ""),
                     "session": session}
    return {"prompts": sum(p["prompts"] for p in per.values()), "wall_time_s": round(sum(sessions.values()), 2),
            "sessions": len(sessions), "per_adapter": per}


def search_cost(spec: MethodSpec) -> dict[str, Any] | None:
    if not spec.search:
        return None
    b = spec.search
    return {"mode": spec.mode, "wall_time_s": b.get("wall_time_s"), "points": b.get("points"),
            "decoded": b.get("decoded"), "aggregate": b.get("aggregate"), "scores": b.get("scores")}


def method_signature(spec: MethodSpec, cfg: RunConfig, prompts: Sequence[str], seeds: Sequence[int]) -> str:
    """A hash of everything a method's results depend on; results with the same signature are reused."""
    from emorl.search.store import adapter_identity

    payload = {"decoder": DECODER_VERSION, "method": spec.name, "mode": spec.mode, "weights": spec.weights,
               "anchor": spec.anchor,
               "adapters": {n: adapter_identity(f) for n, f in spec.adapters.items()},
               "generation": asdict(cfg.eval.generation), "seeds": list(seeds), "prompts": list(prompts),
               "objectives": cfg.objectives, "model": [cfg.model.name, cfg.model.max_prompt_tokens,
                                                       cfg.model.system_prompt]}
    if spec.router is not None:
        from emorl.search.store import file_sha256

        payload["router"] = file_sha256(Path(spec.router) / "router" / "router.safetensors")
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def any_adapter(run: Path, specs: Sequence[MethodSpec]) -> dict[str, Path] | None:
    """One adapter of the run (a method's, else any on disk), for decoding the base through the same engine."""
    for s in specs:
        for name, folder in s.adapters.items():
            return {name: folder}
    for sub in ("adapters", "baselines"):
        for folder in sorted((run / sub).glob("*/adapter_model.safetensors")):
            return {folder.parent.name: folder.parent}
    return None


# ------------------------------------------------------------------------------------------- the run

def eval_prompts(cfg: RunConfig, split: str | None = None) -> list[str]:
    from emorl.data import load_splits

    split = split or cfg.eval.split
    records = load_splits(cfg.data)[split]
    prompts = [r.prompt for r in records[: cfg.eval.prompts] if r.prompt.strip()]
    if not prompts:
        raise EmorlError(f"the {split!r} split of the {cfg.data.source!r} data is empty; raise data.max_prompts or "
                         f"that split's fraction in data.split, or evaluate another split (--split)")
    return prompts


def decode_seeds(cfg: RunConfig) -> list[int]:
    """Greedy decoding ignores the seed, so it runs once; sampling runs once per ``eval.seeds`` entry."""
    seeds = list(dict.fromkeys(cfg.eval.seeds))
    if not seeds:
        raise EmorlError("eval.seeds: give at least one seed, e.g. eval.seeds=[0,1,2]")
    return seeds if cfg.eval.generation.do_sample else seeds[:1]


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval" / "results.json"


def load_results(run_dir: str | Path) -> dict[str, Any] | None:
    p = results_path(run_dir)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EmorlError(f"{p}: corrupt JSON ({e}); delete it and run `emorl evaluate` again") from e


def evaluate_run(run_dir: str | Path, cfg: RunConfig | None = None, methods: Sequence[str] | None = None, *,
                 split: str | None = None, base: Any = None, rewards: dict[str, Any] | None = None,
                 progress: bool = True, force: bool = False, n_samples: int = 3, keep_others: bool = False,
                 decode: Callable[[list[MethodSpec], list[str], list[int]], Iterator[tuple[MethodSpec, list[Any]]]]
                 | None = None) -> dict[str, Any]:
    """Decode and score every method on the same prompts with the same settings; write ``RUN/eval/results.json``
    (and every reply to ``RUN/eval/replies/<method>.jsonl``). A method whose inputs and settings are unchanged
    since the last evaluation is reused, not decoded again (``force`` re-decodes it). ``keep_others`` keeps the
    results of methods not asked for now (made on the same prompts and seeds) in the file. ``decode(specs, prompts,
    seeds)`` yields ``(spec, [(seed, replies, lengths, seconds), ...])`` per method (an executor's
    ``decode_methods``; default: decoded here, one method after another)."""
    from emorl.search.runner import load_run_config
    from emorl.utils import append_jsonl

    run = Path(run_dir)
    cfg = cfg or load_run_config(run)
    split = split or cfg.eval.split
    specs = resolve_methods(run, cfg, methods)  # every input checked before a model loads
    from emorl.judges import check_judges

    check_judges(cfg, [s.name for s in specs])
    from emorl.extra_sets import check_sets

    extra_prompts = check_sets(cfg)  # eval.extra_sets: every set's prompts read before decoding
    prompts = eval_prompts(cfg, split)
    seeds = decode_seeds(cfg)
    objectives = list(cfg.objectives)
    old = load_results(run) or {}
    old_methods = old.get("methods", {}) if old.get("split") == split else {}
    sigs = {s.name: method_signature(s, cfg, prompts, seeds) for s in specs}
    todo = [s for s in specs if force or old_methods.get(s.name, {}).get("signature") != sigs[s.name]]
    results: dict[str, Any] = {
        "version": RESULTS_VERSION, "split": split, "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16], "seeds": seeds,
        "seeds_requested": list(cfg.eval.seeds), "generation": asdict(cfg.eval.generation), "objectives": objectives,
        "model": cfg.model.name, "methods": {}}
    for s in specs:
        if s not in todo:
            log.info("%s: unchanged since the last evaluation, reusing it", s.name)
            results["methods"][s.name] = old_methods[s.name]
    order = [s.name for s in specs]
    if keep_others and old.get("prompts_sha256") == results["prompts_sha256"] and old.get("seeds") == seeds:
        order += [m for m in old_methods if m not in order]
        results["methods"].update({m: old_methods[m] for m in order if m not in results["methods"]})
    if todo:
        if base is None:
            from emorl.models import load_base

            base = load_base(cfg.model)
        if rewards is None:
            from emorl.rewards import build_rewards

            rewards = build_rewards(cfg.objectives, base)
        if decode is None:
            from emorl.decoding import Decoder, decode_with

            decode = decode_with(Decoder(base, cfg.eval.generation, any_adapter(run, specs)))
        from emorl.progress import Progress

        same = same_as_hidden(todo, base)  # logits mixing that would repeat EMORL's decode token for token
        todo = [s for s in todo if s.name not in same]
        with Progress(progress).run() as bars:
            bars.add("evaluate", len(todo) * len(seeds))
            done = 0
            for s, decoded in decode(todo, prompts, seeds):
                bars.update("evaluate", done, s.name)
                reply_file = run / "eval" / "replies" / f"{s.name}.jsonl"
                reply_file.unlink(missing_ok=True)
                per_seed, samples = [], []
                for seed, texts, lengths, seconds in decoded:
                    scores = {o: _score(rewards[o], prompts, texts) for o in objectives}
                    m = reply_metrics(prompts, texts, scores, lengths)
                    m["decode_s"] = seconds
                    m["tokens_per_s"] = sum(lengths) / seconds if seconds > 0 else math.nan
                    per_seed.append({"seed": seed, **m})
                    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
                        append_jsonl(reply_file, {"seed": seed, "prompt": p, "reply": t, "tokens": lengths[i],
                                                  "scores": {o: float(scores[o][i]) for o in objectives}})
                    if not samples:
                        samples = [{"prompt": p, "reply": t} for p, t in zip(prompts[:n_samples], texts, strict=False)]
                    done += 1
                results["methods"][s.name] = {
                    "label": s.label, "kind": s.kind, "mode": s.mode, "signature": sigs[s.name],
                    "adapters": list(s.adapters), "weights": dict(zip(s.adapters, s.weights, strict=True))
                    if s.kind == "ensemble" and s.weights else None,
                    "anchor": s.anchor if s.kind == "ensemble" else None,
                    "per_seed": per_seed, "summary": summarise([{k: v for k, v in d.items() if k != "seed"}
                                                                for d in per_seed]),
                    "training": training_cost(s), "search": search_cost(s), "samples": samples}
                _write(run, results, order)  # a finished method survives an interrupted evaluation
            bars.update("evaluate", done, "done")
        for name, twin in same.items():
            spec = next(x for x in specs if x.name == name)
            results["methods"][name] = {**results["methods"][twin], "label": spec.label, "mode": spec.mode,
                                        "signature": sigs[name], "search": search_cost(spec), "same_as": twin,
                                        "note": f"identical to {method_label(twin)}: with a linear LM head, "
                                                f"sum_k w_k log p_k and head(sum_k w_k h_k) give the same "
                                                f"distribution, so it was decoded once"}
    from emorl.evaluate_stats import add_confidence
    from emorl.judges import add_judges

    add_judges(run, results, cfg, base)  # held-out judges (eval.judges) on the stored replies
    from emorl.kl import add_kl

    add_kl(run, results, cfg, specs, base, any_adapter(run, specs))  # eval.kl: each method's KL to the base
    from emorl.diversity import add_greedy_diversity

    add_greedy_diversity(run, results, cfg, specs, prompts, base, any_adapter(run, specs))  # eval.greedy_diversity
    from emorl.extra_sets import evaluate_extra_sets

    evaluate_extra_sets(run, results, cfg, specs, signature=method_signature, base=base, rewards=rewards,
                        decode=decode, base_adapter=any_adapter(run, specs), prompts_by_set=extra_prompts)
    add_confidence(run, results)  # paired-bootstrap CIs and differences, from the stored replies
    _write(run, results, order)
    return results


def same_as_hidden(specs: Sequence[MethodSpec], base: Any) -> dict[str, str]:
    """Logit-mixing methods with the weights and anchor of a hidden-mixing method in ``specs`` -> that method, when
    the LM head is linear (no soft-capping): log-softmax differs from the logits by a per-row constant, so
    ``sum w_k log p_k`` and ``head(sum w_k h_k)`` (anchored alike) sample the same tokens."""
    from emorl.ensemble.decoder import Head

    lm = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
    if Head(lm, base.is_seq2seq).softcap:
        return {}
    hidden = {(tuple(s.weights or []), s.anchor, tuple(s.adapters)): s.name for s in specs if s.mode == "hidden"}
    return {s.name: hidden[key] for s in specs if s.mode == "logits"
            and (key := (tuple(s.weights or []), s.anchor, tuple(s.adapters))) in hidden}


def _score(reward: Any, prompts: list[str], texts: list[str]) -> np.ndarray:
    from emorl.rewards import score

    return score(reward, prompts, texts)


def _write(run: Path, results: dict[str, Any], order: Sequence[str]) -> None:
    results["methods"] = {m: results["methods"][m] for m in order if m in results["methods"]}
    atomic_write_json(results_path(run), results)

"""Evaluation: the metrics of the paper's comparison, and decoding every method on the test split.

Metrics (pure functions, pinned by hand-computed tests):

* :func:`distinct_n` — Diversity-n as defined by Li et al. (2016): distinct word n-grams ÷ all word n-grams,
  counted over every reply of a method together (corpus level).
* :func:`diversity_reference` — the EMORL reference code's variant: per reply, distinct word bigrams ÷ the
  number of *words* (not bigrams; at most (n−1)/n), averaged over replies, 0 for an empty reply. Kept so
  numbers can be compared with the paper's code; the two differ by construction.
* :func:`mean_std` — mean and sample standard deviation (ddof = 1; 0 for a single value) over seeds.

The methods themselves (names, kinds, labels, what decoding each needs) are :mod:`emorl.methods`. Every method
is decoded with the same :class:`~emorl.config.GenerationConfig`
and the same seeds on the same prompts: the reference code evaluated EMORL greedily but the baselines by
sampling, which confounds the comparison (spec §8.1). :func:`evaluate_run` writes ``RUN/eval/results.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from emorl.config import RunConfig
from emorl.methods import (
    MethodSpec,
    any_adapter,
    decode_seeds,
    decoding_parts,
    eval_prompts,
    method_label,
    resolve_methods,
    search_cost,
    training_cost,
)
from emorl.metrics import (  # noqa: F401 - re-exported: the evaluation's metrics
    distinct_n,
    diversity_reference,
    mean_std,
    ngrams,
    reply_metrics,
    scored_seed,
    summarise,
    words,
)
from emorl.utils import EmorlError, atomic_write_json

log = logging.getLogger("emorl.evaluate")

RESULTS_VERSION = 1
DECODER_VERSION = 4  # bump when the way methods are decoded changes: results made before are not reused


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


# ------------------------------------------------------------------------------------------- the run

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
    seeds)`` yields ``(spec, [(seed, replies, lengths, seconds, finish), ...])`` per method (an executor's
    ``decode_methods``; default: decoded here, one method after another)."""
    from emorl.config import load_run_config
    from emorl.utils import append_jsonl

    run = Path(run_dir)
    cfg = cfg or load_run_config(run)
    split = split or cfg.eval.split
    specs = resolve_methods(run, cfg, methods)  # every input checked before a model loads
    if any(s.kind == "routed" for s in specs):
        from emorl.router.store import read_meta, router_dir

        read_meta(router_dir(run))  # an unknown router version: the error names `emorl route --fresh`
    from emorl.judges import check_judges

    check_judges(cfg, [s.name for s in specs])
    from emorl.extra_sets import check_sets

    extra_prompts = check_sets(cfg, [s.name for s in specs])  # eval.extra_sets: read before decoding
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
        others = [m for m in old_methods if m not in order]  # a method new in `order` has no old result
        order += others
        results["methods"].update({m: old_methods[m] for m in others})
    if todo:
        base, rewards, decode = decoding_parts(cfg, any_adapter(run, specs), base, rewards, decode)
        from emorl.progress import Progress

        todo = [with_routes(s, prompts, base) for s in todo]
        same = same_as_hidden(todo, base)  # logits mixing that would repeat EMORL's decode token for token
        todo = [s for s in todo if s.name not in same]
        from emorl.kl import kl_rows, kl_signature

        n_kl = kl_rows(cfg, len(prompts))  # eval.kl: measured on the evaluation's own decode, not a second one
        with Progress(progress).run() as bars:
            bars.add("evaluate", len(todo) * len(seeds))
            done = 0
            for s, decoded in (decode(todo, prompts, seeds, kl_rows=n_kl) if n_kl else decode(todo, prompts, seeds)):
                bars.update("evaluate", done, s.name)
                reply_file = run / "eval" / "replies" / f"{s.name}.jsonl"
                reply_file.unlink(missing_ok=True)
                per_seed, samples = [], []
                for seed, texts, lengths, seconds, *more in decoded:  # more: how each reply ended, the KL
                    scores = {o: _score(rewards[o], prompts, texts) for o in objectives}
                    m, rows = scored_seed(seed, prompts, texts, lengths, seconds, scores, more[0] if more else None)
                    kl = more[1] if len(more) > 1 else None
                    if kl is not None:
                        for row, v in zip(rows, kl.values, strict=False):
                            row["kl"] = v
                        m["kl_per_token"] = float(np.mean(kl.values))
                    per_seed.append(m)
                    for row in rows:
                        append_jsonl(reply_file, row)
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
                if n_kl and all("kl_per_token" in d for d in per_seed):  # measured: add_kl adds its CI, no re-decode
                    m_res = results["methods"][s.name]
                    m_res["kl_signature"] = kl_signature(m_res, cfg.eval.kl_prompts)
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


def with_routes(spec: MethodSpec, prompts: list[str], base: Any) -> MethodSpec:
    """A routed method with its per-prompt weights (the router of its run, on the base's device); others as
    they are. Decoding (here, or on an executor's workers) then needs no router."""
    if spec.kind != "routed":
        return spec
    from emorl.router.decode import route_weights

    w, _, _ = route_weights(spec.router, list(spec.adapters), prompts, str(base.device))
    return replace(spec, row_weights=w.tolist())


def same_as_hidden(specs: Sequence[MethodSpec], base: Any) -> dict[str, str]:
    """Logit-mixing methods with the weights and anchor of a hidden-mixing method in ``specs`` -> that method, when
    the LM head is linear (no soft-capping): log-softmax differs from the logits by a per-row constant, so
    ``sum w_k log p_k`` and ``head(sum w_k h_k)`` (anchored alike) sample the same tokens."""
    from emorl.ensemble.streams import Head

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

"""Search the mixing weights of a trained run: ``RUN/adapters/*`` -> ``RUN/search/<mode>/``.

:func:`search_run` is what ``emorl search`` and the pipeline call. It checks everything it can (mode,
method, adapters on disk, objective weights, an existing log's header) before loading any model, then
decodes, logs every point, writes ``best.json`` and the figures.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emorl.config import RunConfig, load_run_config
from emorl.search.baselines import grid_search, random_search
from emorl.search.hierarchical import SearchResult, check_search_args, hierarchical_search
from emorl.search.objective import aggregate_weights, build_objective, is_scale_invariant, search_seeds
from emorl.search.store import PointStore, adapter_identity
from emorl.utils import EmorlError

log = logging.getLogger(__name__)

METHODS = ("hierarchical", "grid", "random")


def adapter_folders(run_dir: str | Path, cfg: RunConfig, names: list[str] | None = None) -> dict[str, Path]:
    """RUN/adapters/<objective> for every trained objective (or ``names``), all of which must exist."""
    root = Path(run_dir) / "adapters"
    names = names or cfg.trained_objectives()
    missing = [n for n in names if not (root / n / "adapter_model.safetensors").exists()]
    if missing:
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
        raise EmorlError(f"no trained adapter for objective(s) {', '.join(missing)} in {root} (found: "
                         f"{', '.join(have) or 'none'}). Run `emorl train --run {run_dir}` first")
    return {n: root / n for n in names}


def search_folder(run_dir: str | Path, mode: str, method: str, main: str = "hierarchical") -> Path:
    """RUN/search/<mode>/ for the run's own search (``search.method``, which the evaluation reads); another method
    run beside it for comparison (``emorl search --method``) gets a subfolder."""
    base = Path(run_dir) / "search" / mode
    return base if method == main else base / method


def search_run(run_dir: str | Path, cfg: RunConfig | None = None, *, mode: str = "hidden", method: str | None = None,
               resume: bool = False, fresh: bool = False, progress: bool = True, plots: bool = True,
               names: list[str] | None = None, ensemble: Any = None, prompts: list[str] | None = None,
               objective: Callable[[str, list[str], list[str]], Any] | None = None) -> tuple[SearchResult, Path]:
    """Run one weight search for ``mode`` on the run folder; returns the result and its output folder.

    ``cfg`` defaults to ``RUN/config.yaml``; ``ensemble`` and ``prompts`` may be passed to reuse a loaded
    decoder and a fixed prompt list (otherwise the first ``search.prompts`` validation prompts). ``objective(mode,
    names, prompts)`` builds the search objective elsewhere (an executor's, e.g. one spread over Ray workers)."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    sc = cfg.search
    method = method or sc.method
    from emorl.decoding import parse_mix

    mix_mode, anchor = parse_mix(mode, sc.anchor)  # `mode` is a search key: hidden, hidden-convex, params, ...
    inv = is_scale_invariant(mix_mode, anchor)
    box = 1.0 if inv else float(sc.w_max)
    if not box > 0:
        raise EmorlError(f"search.w_max must be > 0, got {sc.w_max}")
    if method not in METHODS:
        raise EmorlError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if sc.prompts is not None and sc.prompts < 1:
        raise EmorlError(f"search.prompts must be >= 1 (or null: the whole validation split), got {sc.prompts}")
    warn_generation_mismatch(cfg)
    seeds = search_seeds(sc.seeds, sc.generation)
    folders = adapter_folders(run_dir, cfg, names or (list(ensemble.names) if ensemble is not None else None))
    names = list(folders)
    check_search_args(len(names), sc.iterations)
    agg_weights = aggregate_weights(list(cfg.objectives), sc.objective_weights)  # fails now, before any model
    validation: list[str] | None = None
    if prompts is None:
        validation = validation_prompts(cfg)
        prompts = validation[: sc.prompts]
    if not prompts:
        raise EmorlError(f"the validation split of {cfg.data.source!r} data is empty; raise data.max_prompts or "
                         f"the validation fraction (data.split)")
    header = {
        "names": names,
        "adapters": {n: adapter_identity(f) for n, f in folders.items()},
        "mode": mode,
        "anchor": anchor,
        "box": box,
        "method": method,
        "objectives": cfg.objectives,
        "objective_weights": sc.objective_weights,
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16],
        "prompt_list": list(prompts),  # the order of every point's per_prompt scores
        "generation": asdict(sc.generation),
        "seed": sc.seed,
        "seeds": seeds,
        "max_prompt_tokens": cfg.model.max_prompt_tokens,
        "system_prompt": cfg.model.system_prompt,
    }
    if sc.generation.do_sample:  # logs of sampled searches made before common random numbers are not resumed
        header["random_numbers"] = "common to all points"
    out = search_folder(run_dir, mode, method, sc.method)
    store = PointStore(out, header, resume=resume, overwrite=fresh)  # refuses a foreign log before loading
    if objective is not None:
        obj = objective(mode, names, prompts)
    else:
        if ensemble is None:
            from emorl.ensemble import EnsembleModel

            ensemble = EnsembleModel.from_run(run_dir, names=names)
        if list(ensemble.names) != names:
            raise EmorlError(f"the ensemble's adapters {list(ensemble.names)} differ from the run's {names}")
        from emorl.rewards import build_rewards

        rewards = build_rewards(cfg.objectives, getattr(ensemble, "base", None))
        obj = build_objective(ensemble, prompts, rewards, mode, sc, seeds)
    t0 = time.perf_counter()
    # an objective spread over W workers (the Ray executor's) gets W batches at once: a full batch per worker
    batch = sc.batch_points * max(1, int(getattr(obj, "parallelism", 1)))
    common = {"scale_invariant": inv, "store": store, "progress": progress, "batch_points": batch, "box": box}
    if method == "hierarchical":
        result = hierarchical_search(obj, len(names), sc.iterations, desc=f"search {mode}", **common)
    elif method == "grid":
        result = grid_search(obj, len(names), sc.grid_points, **common)
    else:
        result = random_search(obj, len(names), sc.random_points, seed=sc.seed, **common)
    payload = result.to_json(names)
    payload.update({"mode": mix_mode, "search_key": mode, "anchor": anchor, "box": box, "scale_invariant": inv,
                    "prompts": len(prompts), "seeds": seeds, "iterations": sc.iterations,
                    "objective_weights": list(agg_weights), "adapters": header["adapters"],
                    "search_aggregate": result.aggregate, "search_scores": result.scores})
    previous = store.folder / "best.json"
    previous_reeval = (_read_json(previous).get("reeval") if resume and previous.exists() else None)
    reeval = _reevaluate(cfg, result, names, prompts, validation, inv, previous_reeval,
                         (lambda p, sd: objective(mode, names, p, sd)) if objective is not None else
                         (lambda p, sd: build_objective(ensemble, p, rewards, mode, sc, sd)))
    if reeval is not None:
        payload["reeval"] = reeval
        if "chosen" in reeval:
            chosen = reeval["points"][reeval["chosen"]]
            payload.update({"weights": chosen["weights"], "weight_vector": [chosen["weights"][n] for n in names],
                            "aggregate": chosen["search_aggregate"], "scores": chosen["search_scores"],
                            "reeval_aggregate": chosen["aggregate"], "reeval_scores": chosen["scores"]})
    payload["wall_time_s"] = round(time.perf_counter() - t0, 3)
    store.write_best(payload)
    if plots:
        from emorl.search.plots import plot_all

        plot_all(result, names, out, mode=mode)
    return result, out


def validation_prompts(cfg: RunConfig) -> list[str]:
    from emorl.data import load_splits

    return [r.prompt for r in load_splits(cfg.data).validation if r.prompt.strip()]


def warn_generation_mismatch(cfg: RunConfig) -> bool:
    """Warn when the search decodes otherwise than the evaluation (it then ranks points on other replies than the
    ones the evaluation scores); True when they differ."""
    sg, eg = asdict(cfg.search.generation), asdict(cfg.eval.generation)
    if sg == eg:
        return False
    diff = ", ".join(f"{k}: search {sg[k]!r} vs eval {eg[k]!r}" for k in sg if sg[k] != eg.get(k))
    log.warning("search.generation (%s) differs from eval.generation (%s): %s. The search then scores other replies "
                "than the evaluation decodes; set search.generation equal to eval.generation", sg, eg, diff)
    return True


def _reevaluate(cfg: RunConfig, result: SearchResult, names: list[str], prompts: list[str],
                validation: list[str] | None, scale_invariant: bool, previous: dict[str, Any] | None,
                make: Callable[[list[str], list[int]], Any]) -> dict[str, Any] | None:
    """Re-score the top ``search.reeval_top`` points on ``reeval_prompts`` x ``reeval_seeds``; the payload says
    which one is chosen, or why the re-evaluation was skipped (off, or it would decode exactly what the search
    decoded: the same prompts under greedy decoding, or the same prompts and seeds)."""
    from emorl.search.reeval import reeval_payload, reevaluate, top_points

    sc = cfg.search
    if sc.reeval_top < 1:
        return None
    if validation is None:  # prompts were given by the caller: re-evaluate on the same ones
        validation = list(prompts)
    rprompts = validation[: sc.reeval_prompts]
    rseeds = search_seeds(sc.reeval_seeds, sc.generation)
    same_seeds = not sc.generation.do_sample or rseeds == search_seeds(sc.seeds, sc.generation)
    if rprompts == list(prompts) and same_seeds:
        return {"skipped": "the re-evaluation would decode the same prompts with the same (or greedy) decoding as "
                           "the search; raise search.reeval_prompts above search.prompts, or sample with fresh "
                           "search.reeval_seeds"}
    candidates = top_points(result.points, sc.reeval_top, scale_invariant)
    if not candidates:
        return {"skipped": "no decodable point"}
    sha = hashlib.sha256("\x1f".join(rprompts).encode()).hexdigest()[:16]
    if (previous and previous.get("prompts_sha256") == sha and previous.get("seeds") == rseeds
            and [list(p["weights"].values()) for p in previous.get("points", [])] == [list(c.weights)
                                                                                     for c in candidates]):
        log.info("the re-evaluation of these top points is already in best.json; reusing it")
        return previous
    obj = make(rprompts, rseeds)
    chosen, scores = reevaluate(obj, candidates)
    log.info("re-evaluated the top %d points on %d prompts x %d seeds; chose %s (search %.4f, re-evaluated %.4f)",
             len(candidates), len(rprompts), len(rseeds), list(candidates[chosen].weights),
             candidates[chosen].aggregate, scores[chosen].aggregate)
    return reeval_payload(candidates, scores, chosen, names, len(rprompts), rseeds) | {"prompts_sha256": sha}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

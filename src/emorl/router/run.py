"""Fitting a run's router: collect (or reuse) the data, embed the prompts, fit, store in ``RUN/router/``.

The data is reused when its settings (route settings, generation, adapters, prompts) are unchanged; the router
itself is cheap to refit.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from emorl.router.data import SEARCH_KEY, collect, load_data, save_data, search_best, training_prompts
from emorl.router.fit import Router, fit_router
from emorl.router.store import embed, read_meta, router_dir, run_adapters, save_router
from emorl.utils import EmorlError

log = logging.getLogger("emorl.route")
MODE = "hidden"  # the router picks weights for EMORL's hidden-state mix


def route_settings(cfg: Any, adapters: dict[str, str | None]) -> dict[str, Any]:
    """What the router depends on (a change refits it; the data-only part decides whether data is reused)."""
    return {"route": dataclasses.asdict(cfg.route), "generation": dataclasses.asdict(cfg.eval.generation),
            "objectives": cfg.objectives, "objective_weights": cfg.search.objective_weights, "adapters": adapters,
            "data": dataclasses.asdict(cfg.data), "model": [cfg.model.name, cfg.model.max_prompt_tokens,
                                                            cfg.model.system_prompt]}


def _data_key(settings: dict[str, Any]) -> dict[str, Any]:
    r = {k: v for k, v in settings["route"].items() if k in ("split", "prompts", "step", "seeds", "use_search")}
    return {**{k: v for k, v in settings.items() if k not in ("route", "objective_weights")}, "route": r}


def route_status(cfg: Any, run: Path, adapters: dict[str, str | None]) -> tuple[str, str]:
    """("done" | "run" | "redo", why) for the pipeline's plan; loads no model."""
    try:
        meta = read_meta(router_dir(run))
    except EmorlError:
        return "run", "not fitted yet"
    if meta.get("settings") != _jsonable(route_settings(cfg, adapters)):
        return "redo", "settings or adapters changed"
    return "done", "up to date"


def _jsonable(d: Any) -> Any:
    import json

    return json.loads(json.dumps(d, default=str))


def fit_run(run: str | Path, cfg: Any, *, base: Any = None, rewards: dict[str, Any] | None = None, ens: Any = None,
            fresh: bool = False) -> tuple[Router, dict[str, Any]]:
    """Fit and store the router of ``run``; returns it and its stored metadata."""
    from emorl.methods import ensemble_objectives
    from emorl.search.objective import aggregate_weights

    run = Path(run)
    names = ensemble_objectives(cfg)
    adapters = run_adapters(run, names)
    settings = _jsonable(route_settings(cfg, adapters))
    folder = router_dir(run)
    prompts = training_prompts(cfg, cfg.route.split, cfg.route.prompts)
    data = None
    if not fresh and (folder / "data.json").exists():
        try:
            old = load_data(folder)
            if old.meta.get("key") == _data_key(settings) and old.lattice.prompts == prompts:
                data = old
                log.info("router data in %s is current; reusing it", folder)
        except EmorlError as e:
            log.warning("%s; collecting the router data again", e)
    if data is None:
        if ens is None:
            from emorl.ensemble.model import EnsembleModel

            if base is None:
                from emorl.models import load_base

                base = load_base(cfg.model)
            ens = EnsembleModel(base, {n: run / "adapters" / n for n in names})
        if rewards is None:
            from emorl.rewards import build_rewards

            rewards = build_rewards(cfg.objectives, ens.base)
        data = collect(run, cfg, ens, {o: rewards[o] for o in cfg.objectives}, prompts=prompts, mode=MODE)
        data.meta["key"] = _data_key(settings)
        save_data(folder, data)
    device = str(ens.device) if ens is not None else (str(base.device) if base is not None else "cpu")
    emb_blocks = [embed(b.prompts, device) for b in data.blocks]
    rc = cfg.route
    best = search_best(run, SEARCH_KEY) if rc.use_search else None
    router = fit_router(data, emb_blocks, aggregate_weights(data.objectives, cfg.search.objective_weights),
                        method=rc.method, k=rc.k, alpha=rc.ridge_alpha, folds=rc.folds,
                        percentile=rc.fallback_percentile, seed=rc.seed, global_weights=best)
    router.info["data"] = {"points": int(len(data.lattice.points)), "prompts": len(data.lattice.prompts),
                           "seeds": len(data.meta.get("seeds", [])), "decode_s": data.meta.get("decode_s"),
                           "blocks": [b.source for b in data.blocks]}
    save_router(folder, router, adapters=adapters, settings=settings,
                prompts=[p for b in data.blocks for p in b.prompts])
    log.info("router (%s) fitted on %d prompts; cross-validated mean reward %s; fallback beyond cosine distance "
             "%.3f", router.method, len(router.emb), {k: round(v, 4) for k, v in router.info["cv"].items()},
             router.threshold)
    return router, read_meta(folder)


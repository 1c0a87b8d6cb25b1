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

from emorl.config import RunConfig, load_config
from emorl.search.baselines import grid_search, random_search
from emorl.search.hierarchical import SearchResult, check_search_args, hierarchical_search
from emorl.search.objective import aggregate_weights, build_objective, is_scale_invariant
from emorl.search.store import PointStore, adapter_identity
from emorl.utils import EmorlError

log = logging.getLogger(__name__)

METHODS = ("hierarchical", "grid", "random")


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise EmorlError(f"{path} does not exist: --run must be a run folder made by `emorl train` (it holds "
                         f"config.yaml and adapters/<objective>/)")
    return load_config(str(path), overrides)


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


def search_folder(run_dir: str | Path, mode: str, method: str) -> Path:
    """RUN/search/<mode>/ for the hierarchical search; the comparators get a subfolder each."""
    base = Path(run_dir) / "search" / mode
    return base if method == "hierarchical" else base / method


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
    if sc.prompts < 1:
        raise EmorlError(f"search.prompts must be >= 1, got {sc.prompts}")
    folders = adapter_folders(run_dir, cfg, names or (list(ensemble.names) if ensemble is not None else None))
    names = list(folders)
    check_search_args(len(names), sc.iterations)
    agg_weights = aggregate_weights(list(cfg.objectives), sc.objective_weights)  # fails now, before any model
    if prompts is None:
        from emorl.data import load_splits

        prompts = [r.prompt for r in load_splits(cfg.data).validation[: sc.prompts]]
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
        "generation": asdict(sc.generation),
        "seed": sc.seed,
        "max_prompt_tokens": cfg.model.max_prompt_tokens,
        "system_prompt": cfg.model.system_prompt,
    }
    if sc.generation.do_sample:  # logs of sampled searches made before common random numbers are not resumed
        header["random_numbers"] = "common to all points"
    out = search_folder(run_dir, mode, method)
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
        obj = build_objective(ensemble, prompts, rewards, mode, sc)
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
                    "prompts": len(prompts), "iterations": sc.iterations,
                    "wall_time_s": round(time.perf_counter() - t0, 3), "objective_weights": list(agg_weights),
                    "adapters": header["adapters"]})
    store.write_best(payload)
    if plots:
        from emorl.search.plots import plot_all

        plot_all(result, names, out, mode=mode)
    return result, out

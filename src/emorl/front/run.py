"""``emorl front``: each mixing mode's empirical Pareto front and hypervolume on the evaluation's prompts.

One set of K adapters spans a whole front of trade-offs after training, where a one-policy baseline is one point.
For every mode of ``front.modes`` a lattice of weight points is decoded and scored on the same (prompt, seed) units as
the evaluation; the front is the non-dominated set of the points' mean scores. Its hypervolume is measured against
the **base model's per-objective mean scores** (the reference point: what the untuned model already achieves), with a
bootstrap CI over units in which the reference is resampled with the same units (paired). Every one-policy method of
the evaluation (Uniform, DynaOpt, GDPO, each adapter alone) is placed against each front: dominated (the front holds
a point at least as good in every objective and better in one), dominating some front point, or incomparable.

Writes ``RUN/front/front.json`` (the analysis), ``RUN/front/<mode>.json`` (every point with its per-unit scores,
reused while the inputs are unchanged) and ``RUN/front/front.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from emorl.config import RunConfig
from emorl.front.lattice import box_lattice, score_lattice
from emorl.stats import dominance, hypervolume_ci, hypervolume_difference, pareto_front
from emorl.utils import EmorlError, atomic_write_json

log = logging.getLogger("emorl.front")
FRONT_VERSION = 1
REFERENCE = "base"


def front_dir(run: Path) -> Path:
    return run / "front"


def _file(run: Path, entry: str) -> Path:
    return front_dir(run) / f"{entry.replace(':', '_')}.json"


def searched_point(run: Path, key: str, names: list[str]) -> list[float] | None:
    """The searched weights of a mix (``RUN/search/<key>/best.json``), if that search ran on these adapters."""
    p = run / "search" / key / "best.json"
    if not p.exists():
        return None
    best = json.loads(p.read_text())
    if list(best.get("names", [])) != names or not any(best.get("weight_vector", [])):
        return None
    return [float(x) for x in best["weight_vector"]]


def _inputs(run: Path, cfg: RunConfig) -> tuple[dict[str, Any], list[str], list[int], np.ndarray]:
    """The evaluation the front pairs with: its results, prompts, seeds and the base model's per-unit scores."""
    from emorl.evaluate import load_results
    from emorl.methods import decode_seeds, eval_prompts

    results = load_results(run)
    fix = f"`emorl evaluate --run {run}` (with `base` among the methods)"
    if not results or REFERENCE not in results.get("methods", {}):
        raise EmorlError(f"the front needs the evaluation of the base model (its scores are the hypervolume's "
                         f"reference point): {run / 'eval' / 'results.json'} has none. Run {fix} first")
    prompts, seeds = eval_prompts(cfg, results["split"]), decode_seeds(cfg)
    sha = hashlib.sha256("\x1f".join(prompts).encode()).hexdigest()[:16]
    if results.get("prompts_sha256") != sha or results.get("seeds") != seeds or \
            results.get("generation") != asdict(cfg.eval.generation):
        raise EmorlError(f"{run / 'eval' / 'results.json'} was made on other prompts, seeds or decoding settings "
                         f"than the config's eval section; the front would not pair with it. Run {fix} again")
    ref = _method_units(run, results, REFERENCE, prompts, seeds, cfg)
    if ref is None:
        raise EmorlError(f"{run / 'eval' / 'replies' / 'base.jsonl'} is missing or incomplete. Run {fix} again")
    return results, prompts, seeds, ref


def _method_units(run: Path, results: dict[str, Any], method: str, prompts: list[str], seeds: list[int],
                  cfg: RunConfig) -> np.ndarray | None:
    """(units, objectives) scores of an evaluated method on the front's units (front.prompts, front.seeds), in
    (seed, prompt) order; None where its replies are missing."""
    from emorl.evaluate_stats import unit_scores

    objectives = list(results["objectives"])
    name = (results["methods"].get(method) or {}).get("same_as") or method
    units = unit_scores(run / "eval" / "replies" / f"{name}.jsonl", objectives)
    if units is None or len(units["mean_reward"]) != len(prompts) * len(seeds):
        return None
    full = np.stack([units[f"score/{o}"] for o in objectives], axis=1).reshape(len(seeds), len(prompts), -1)
    keep = [seeds.index(s) for s in (cfg.front.seeds or seeds)]
    return full[keep, :cfg.front.prompts or None].reshape(-1, len(objectives))


def _signature(cfg: RunConfig, entry: str, adapters: dict[str, str], points: np.ndarray, prompts: list[str],
               seeds: list[int]) -> str:
    payload = {"version": FRONT_VERSION, "entry": entry, "adapters": adapters, "points": points.tolist(),
               "prompts": prompts, "seeds": seeds, "generation": asdict(cfg.eval.generation),
               "objectives": cfg.objectives, "model": [cfg.model.name, cfg.model.max_prompt_tokens,
                                                       cfg.model.system_prompt]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def front_run(run_dir: str | Path, cfg: RunConfig | None = None, *, base: Any = None,
              rewards: dict[str, Any] | None = None, progress: bool = True, force: bool = False,
              plot: bool = True) -> dict[str, Any]:
    """Decode (or reuse) every mode's lattice, analyse the fronts, write ``RUN/front/``; returns front.json."""
    from emorl.config import load_run_config
    from emorl.methods import ensemble_objectives
    from emorl.search.runner import adapter_folders
    from emorl.search.store import adapter_identity

    run = Path(run_dir)
    cfg = cfg or load_run_config(run)
    fc = cfg.front
    names = ensemble_objectives(cfg)
    folders = adapter_folders(run, cfg, names)
    adapters = {n: adapter_identity(f) for n, f in folders.items()}
    results, all_prompts, all_seeds, ref_units = _inputs(run, cfg)
    prompts, seeds = all_prompts[:fc.prompts or None], fc.seeds or all_seeds
    objectives = list(results["objectives"])
    plans: dict[str, dict[str, Any]] = {}
    for entry in dict.fromkeys(fc.modes):
        from emorl.decoding import parse_mix

        mode, anchor = parse_mix(entry, cfg.search.anchor)  # a search key: hidden, hidden-convex, params, ...
        pts = box_lattice(len(names), fc.step, fc.w_max)
        searched = searched_point(run, entry, names)
        if searched is not None and not any(np.allclose(p, searched) for p in pts):
            pts = np.vstack([pts, searched])
        plans[entry] = {"mode": mode, "anchor": anchor, "points": pts, "searched": searched}
    if fc.sweep:
        from emorl.front.linear import sweep_points

        pair = (names.index(fc.sweep[0]), names.index(fc.sweep[1]))
        for mode in dict.fromkeys(fc.sweep_modes):
            plans[f"sweep-{mode}"] = {"mode": mode, "anchor": "none", "points": sweep_points(len(names), pair),
                                      "searched": None}
    for entry, p in plans.items():
        p["signature"] = _signature(cfg, entry, adapters, p["points"], prompts, seeds)
        old = _read(_file(run, entry))
        p["cached"] = None if force or old.get("signature") != p["signature"] else old
    todo = [e for e, p in plans.items() if p["cached"] is None]
    if todo:
        if base is None:
            from emorl.models import load_base

            base = load_base(cfg.model)
        if rewards is None:
            from emorl.rewards import build_rewards

            rewards = build_rewards(cfg.objectives, base)
        from emorl.ensemble.model import EnsembleModel
        from emorl.models import environment
        from emorl.progress import Progress

        ens = EnsembleModel(base, dict(folders))
        env = environment(base)
        with Progress(progress).run() as bars:
            for entry in todo:
                p = plans[entry]
                bars.add(f"front {entry}", len(p["points"]) * len(seeds))
                done = [0]

                def tick(n: int, entry: str = entry, done: list[int] = done) -> None:
                    done[0] += n
                    bars.update(f"front {entry}", done[0], entry)

                u = score_lattice(ens, p["points"], prompts, seeds, {o: rewards[o] for o in objectives},
                                  cfg.eval.generation, mode=p["mode"], anchor=p["anchor"],
                                  batch_points=fc.batch_points, progress=tick)
                p["cached"] = _write_points(run, entry, p, names, objectives, u, env)
    fronts = {e: p["cached"] for e, p in plans.items() if not e.startswith("sweep-")}
    one_policy = {m: _method_units(run, results, m, all_prompts, all_seeds, cfg)
                  for m, v in results["methods"].items() if v.get("kind") == "adapter"}
    clusters = np.tile(np.arange(len(prompts)), len(seeds))  # units are (seed, prompt): resample prompts
    analysis = analyse(results, fronts, ref_units, names, objectives, resamples=fc.resamples, clusters=clusters,
                       one_policy_units={m: u for m, u in one_policy.items() if u is not None})
    analysis.update({"environment": {e: p["cached"].get("environment") for e, p in plans.items()},
                     "version": FRONT_VERSION, "split": results["split"], "prompts": len(prompts), "seeds": seeds,
                     "step": fc.step, "w_max": fc.w_max, "generation": asdict(cfg.eval.generation)})
    if fc.linear:
        singles = [_method_units(run, results, f"single:{n}", all_prompts, all_seeds, cfg) for n in names]
        if any(s is None for s in singles):
            analysis["linear"] = {"skipped": "needs every adapter alone in the evaluation (`singles` in "
                                             "eval.methods)"}
        else:
            analysis["linear"] = linear_analysis(fronts, np.stack(singles), ref_units, objectives, clusters)
    if fc.sweep:
        from emorl.front.linear import sweep_dip

        analysis["sweep"] = {"pair": list(fc.sweep), "t": [round(x, 1) for x in np.linspace(0, 1, 11)],
                             "what": "t is the weight of the first adapter, 1 - t of the second (sum 1)",
                             "pools": {m: sweep_dip(_point_units(plans[f"sweep-{m}"]["cached"], objectives),
                                                    clusters=clusters) for m in dict.fromkeys(fc.sweep_modes)}}
    analysis["statements"] += _extra_statements(analysis)
    if plot:
        from emorl.front.plots import plot_fronts

        fig = plot_fronts(analysis, fronts, front_dir(run) / "front.png")
        analysis["figure"] = str(fig.relative_to(run))
    atomic_write_json(front_dir(run) / "front.json", analysis)
    return analysis


def _extra_statements(analysis: dict[str, Any]) -> list[str]:
    """The linear-prediction and edge-sweep answers in words."""
    out = []
    for entry, g in (analysis.get("linear") or {}).items():
        if not isinstance(g, dict):
            continue
        lo, hi = g["mean_gap_ci95"]
        out.append(f"{entry} against the linear prediction from the adapters alone (mean reward): {g['above']} of "
                   f"{g['points']} points resolved above it, {g['below']} below, {g['unresolved']} unresolved; the "
                   f"average gap is {g['mean_gap']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                   f" ({'resolved' if lo > 0 or hi < 0 else 'unresolved'}).")
    sw = analysis.get("sweep")
    for pool, d in (sw or {}).get("pools", {}).items():
        diff = d["interior_minus_lower_end"]
        lo, hi = diff["ci95"]
        t = sw["t"][d["lowest_interior"]]
        out.append(f"edge sweep {sw['pair'][0]}/{sw['pair'][1]}, {pool} pool: mean reward from "
                   f"{d['mean_reward'][0]:.3f} (t=0) to {d['mean_reward'][-1]:.3f} (t=1); its lowest interior point "
                   f"(t={t}) is {diff['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] against the lower end: "
                   + ("a dip below both ends (resolved)." if d["dip"] else "no resolved dip below both ends."))
    return out


def _point_units(data: dict[str, Any], objectives: list[str]) -> np.ndarray:
    """(points, units, objectives) per-unit scores of a stored lattice."""
    return np.array([[r["units"][o] for o in objectives] for r in data["points"]]).transpose(0, 2, 1)


def linear_analysis(fronts: dict[str, dict[str, Any]], singles: np.ndarray, ref_units: np.ndarray,
                    objectives: list[str], clusters: np.ndarray | None = None) -> dict[str, Any]:
    """Per mode: every lattice point's mean reward against the linear prediction from the adapters alone."""
    from emorl.front.linear import linear_gaps, linear_prediction

    out = {}
    for entry, data in fronts.items():
        pts = np.array([[r["weights"][n] for n in data["names"]] for r in data["points"]])
        pred = linear_prediction(pts, singles, ref_units, convex=data["anchor"] == "none")
        gaps = linear_gaps(_point_units(data, objectives), pred, clusters=clusters)
        gaps.pop("per_point")
        out[entry] = gaps
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_points(run: Path, entry: str, p: dict[str, Any], names: list[str], objectives: list[str],
                  units: np.ndarray, env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store one entry's decoded points with their per-unit scores and the machine / dtype that decoded them."""
    rows = []
    units = np.round(units, 6)  # what is stored is what every number is computed from
    for i, w in enumerate(p["points"]):
        rows.append({"weights": dict(zip(names, map(float, w), strict=True)),
                     "searched": p["searched"] is not None and bool(np.allclose(w, p["searched"])),
                     "scores": {o: float(units[i, :, j].mean()) for j, o in enumerate(objectives)},
                     "units": {o: units[i, :, j].tolist() for j, o in enumerate(objectives)}})
    data = {"version": FRONT_VERSION, "entry": entry, "mode": p["mode"], "anchor": p["anchor"],
            "signature": p["signature"], "names": names, "objectives": objectives, "environment": env, "points": rows}
    atomic_write_json(_file(run, entry), data)
    return data


def analyse(results: dict[str, Any], modes: dict[str, dict[str, Any]], ref_units: np.ndarray, names: list[str],
            objectives: list[str], *, resamples: int = 500, seed: int = 0, clusters: np.ndarray | None = None,
            one_policy_units: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Fronts, hypervolumes (CI) and dominance statements from stored points and evaluation results; a one-policy
    method is placed by its mean on the front's units (``one_policy_units``) where given, else by its summary."""
    ref = ref_units.mean(axis=0)
    out_modes: dict[str, Any] = {}
    fronts: dict[str, np.ndarray] = {}
    for entry, data in modes.items():
        rows = data["points"]
        means = np.array([[r["scores"][o] for o in objectives] for r in rows])
        units = _point_units(data, objectives)
        idx = pareto_front(means)
        fronts[entry] = means[idx]
        hv = hypervolume_ci(units, ref_units, clusters=clusters, resamples=resamples, seed=seed)
        out_modes[entry] = {"mode": data["mode"], "anchor": data["anchor"], "points": len(rows),
                            "front": [{"weights": rows[i]["weights"], "scores": rows[i]["scores"],
                                       "searched": rows[i]["searched"]} for i in idx],
                            "hypervolume": hv["hypervolume"], "hypervolume_ci95": hv["ci95"]}
    entries = list(modes)
    differences = {f"{x} - {y}": hypervolume_difference(_point_units(modes[x], objectives),
                                                        _point_units(modes[y], objectives), ref_units,
                                                        clusters=clusters, resamples=resamples, seed=seed)
                   for i, x in enumerate(entries) for y in entries[i + 1:]}
    one_policy: dict[str, Any] = {}
    statements: list[str] = []
    for name, m in results["methods"].items():
        if m.get("kind") != "adapter":
            continue
        if one_policy_units and name in one_policy_units:
            point = [float(x) for x in one_policy_units[name].mean(axis=0)]
        else:
            point = [m["summary"][f"score/{o}"]["mean"] for o in objectives]
        against = {e: dominance(f, point) for e, f in fronts.items()}
        one_policy[name] = {"label": m["label"], "scores": dict(zip(objectives, point, strict=True)),
                            "fronts": {e: {"verdict": d["verdict"], "dominated_by": len(d["dominated_by"]),
                                           "dominates": len(d["dominates"])} for e, d in against.items()}}
    for entry in fronts:
        dom = [v["label"] for v in one_policy.values() if v["fronts"][entry]["verdict"] == "dominated"]
        rest = [v["label"] for v in one_policy.values() if v["fronts"][entry]["verdict"] != "dominated"]
        lo, hi = out_modes[entry]["hypervolume_ci95"]
        statements.append(f"{entry}: hypervolume {out_modes[entry]['hypervolume']:.4f} [{lo:.4f}, {hi:.4f}] over "
                          f"{out_modes[entry]['points']} points; its front dominates "
                          f"{', '.join(dom) if dom else 'none of the one-policy points'}"
                          + (f"; not dominated: {', '.join(rest)}" if rest else "") + ".")
    for pair, d in differences.items():
        lo, hi = d["ci95"]
        statements.append(f"hypervolume {pair}: {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] (paired over units, "
                          + ("resolved)." if d["resolved"] else "unresolved)."))
    return {"objectives": objectives, "names": names,
            "reference": {"what": "the base model's per-objective mean scores on the same (prompt, seed) units "
                                  "(resampled with them in the CI)", "scores": dict(zip(objectives, map(float, ref),
                                                                                       strict=True))},
            "units": int(ref_units.shape[0]), "resamples": resamples, "modes": out_modes,
            "hypervolume_differences": differences, "one_policy": one_policy,
            "statements": statements}

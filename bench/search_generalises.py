"""Does the search's score survive on test? The top points of a finished search, decoded on the test split.

    python bench/search_generalises.py --run runs/default --mode hidden --top 8 [--prompts 48]

For one search (``RUN/search/<mode>/``) the ``--top`` points with the highest search aggregate (and every point the
re-evaluation scored) are decoded on the evaluation's test units (its prompts, seeds and decoding settings, the
first ``--prompts`` of them) in the batched multi-point path, and scored with the run's rewards. It reports:

- the Spearman correlation between the search aggregate and the test mean reward over those points, and between the
  re-evaluated aggregate and test over the re-evaluated points;
- the search-to-test drop of the search's raw winner (the choice *before* the re-evaluation) and of the chosen point
  (``best.json``, *after* it), each a paired bootstrap CI over test units of the winner's test mean reward;
- which of the two choices scores higher on test, paired.

The test split is only read here, never used to choose. Writes bench/results/search_generalises_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--mode", default="hidden", help="search key (hidden, hidden-convex, params, ...)")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=None, help="first N test prompts (default: all evaluated)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from scipy.stats import spearmanr

    from emorl.config import load_run_config
    from emorl.decoding import parse_mix
    from emorl.ensemble.model import EnsembleModel
    from emorl.evaluate import load_results
    from emorl.front.lattice import score_lattice
    from emorl.methods import decode_seeds, ensemble_objectives, eval_prompts
    from emorl.models import load_base
    from emorl.rewards import build_rewards
    from emorl.search.runner import adapter_folders
    from emorl.stats import bootstrap_ci, paired_difference

    run = Path(args.run)
    cfg = load_run_config(run)
    folder = run / "search" / args.mode
    best = json.loads((folder / "best.json").read_text())
    rows = [json.loads(x) for x in (folder / "points.jsonl").read_text().splitlines()[1:] if x.strip()]
    names = best["names"]
    uniq: dict[tuple[float, ...], dict] = {}
    for r in rows:  # a point decoded twice (a re-used direction) keeps its first score
        uniq.setdefault(tuple(round(w, 6) for w in r["weights"]), r)
    ranked = sorted(uniq.values(), key=lambda r: -r["aggregate"])
    reeval = {tuple(round(p["weights"][n], 6) for n in names): p for p in (best.get("reeval") or {}).get("points", [])}
    top_keys = [tuple(round(w, 6) for w in r["weights"]) for r in ranked[:args.top]]
    keys = list(dict.fromkeys(top_keys + list(reeval)))
    points = np.array(keys, dtype=float)

    results = load_results(run)
    prompts = eval_prompts(cfg, results["split"])[:args.prompts or None]
    seeds = decode_seeds(cfg)
    base = load_base(cfg.model)
    rewards = build_rewards(cfg.objectives, base)
    objectives = list(results["objectives"])
    mode, anchor = parse_mix(args.mode, cfg.search.anchor)
    ens = EnsembleModel(base, dict(adapter_folders(run, cfg, ensemble_objectives(cfg))))
    t0 = time.perf_counter()
    units = score_lattice(ens, points, prompts, seeds, {o: rewards[o] for o in objectives}, cfg.eval.generation,
                          mode=mode, anchor=anchor, batch_points=cfg.front.batch_points)
    seconds = time.perf_counter() - t0
    test = units.mean(axis=2)  # (points, units): mean reward per unit
    test_mean = test.mean(axis=1)
    search_agg = np.array([uniq[k]["aggregate"] for k in keys])
    top = [keys.index(k) for k in top_keys]
    re_idx = [i for i, k in enumerate(keys) if k in reeval]
    raw_winner = keys.index(tuple(round(w, 6) for w in ranked[0]["weights"]))
    chosen = keys.index(tuple(round(w, 6) for w in best["weight_vector"]))

    def drop(i: int, score: float) -> dict:
        lo, hi = bootstrap_ci(test[i])
        return {"weights": list(keys[i]), "score": score, "test": float(test_mean[i]), "test_ci95": [lo, hi],
                "drop": float(score - test_mean[i]), "drop_ci95": [float(score - hi), float(score - lo)]}

    out = {
        "run": str(run), "mode": args.mode, "split": results["split"], "prompts": len(prompts), "seeds": seeds,
        "points": len(keys), "decode_seconds": round(seconds, 1),
        "search": {"prompts": best.get("prompts"), "seeds": best.get("seeds")},
        "reeval": {k: (best.get("reeval") or {}).get(k) for k in ("prompts", "seeds")},
        "spearman_search_vs_test": _rho(spearmanr, search_agg[top], test_mean[top]),
        "spearman_reeval_vs_test": _rho(spearmanr, np.array([reeval[keys[i]]["aggregate"] for i in re_idx]),
                                        test_mean[re_idx]) if len(re_idx) > 2 else None,
        "before_reeval": drop(raw_winner, float(search_agg[raw_winner])),
        "after_reeval": {**drop(chosen, float(search_agg[chosen])),  # the chosen point's own search score
                         "reeval_score": best.get("reeval_aggregate"),
                         "reeval_drop": (float(best["reeval_aggregate"] - test_mean[chosen])
                                         if best.get("reeval_aggregate") is not None else None)},
        "after_minus_before_on_test": paired_difference(test[chosen], test[raw_winner]),
        "table": [{"weights": list(k), "search": float(search_agg[i]),
                   "reeval": reeval[k]["aggregate"] if k in reeval else None, "test": float(test_mean[i])}
                  for i, k in enumerate(keys)],
    }
    path = Path(args.out) if args.out else OUT / f"search_generalises_{args.mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1))


def _rho(spearmanr, a: np.ndarray, b: np.ndarray) -> dict | None:
    if len(a) < 3:
        return None
    r = spearmanr(a, b)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(a)}


if __name__ == "__main__":
    main()

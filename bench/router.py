"""Router benchmark: (1) the cost of the router's data on a model, (2) the honest comparison on a finished run,
(3) the synthetic case where the best weights depend on the prompt by construction.

    python bench/router.py cost --model smollm2-135m-instruct --prompts 8     # time the lattice decode
    python bench/router.py compare --run runs/default                          # fit (if needed) + compare
    python bench/router.py synthetic                                           # no model: router vs oracle
    python bench/router.py --out DIR cost --model tiny-llama --prompts 2       # smoke run on the tiny model

Results go to bench/results/router_<what>.json (``--out`` another folder).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


def cost(args: argparse.Namespace) -> dict:
    """Decode the default lattice (K=3, step 0.25: 15 points, +1 for the search's best) on a few training prompts
    with random LoRA adapters (r=8, all linear, B ~ N(0, 0.02)), sampled as the default preset's evaluation, and
    extrapolate to route.prompts x route.seeds."""

    from emorl.config import load_config
    from emorl.ensemble import EnsembleModel
    from emorl.models import add_adapters, load_base, randomize_lora_b
    from emorl.rewards import build_rewards
    from emorl.router.data import decode_scores, simplex_lattice, training_prompts

    cfg = load_config(args.preset, [f"model.name={args.model}"] if args.model else [])
    base = load_base(cfg.model)
    names = list(cfg.objectives)
    randomize_lora_b(add_adapters(base, names, cfg.lora), std=0.02)
    ens = EnsembleModel(base)
    rewards = build_rewards(cfg.objectives, base)
    pts = np.vstack([simplex_lattice(len(names), cfg.route.step), np.full((1, len(names)), 1 / len(names))])
    prompts = training_prompts(cfg, "train", args.prompts)
    t0 = time.perf_counter()
    decode_scores(ens, prompts, pts, rewards, cfg.eval.generation, [0])
    sec = time.perf_counter() - t0
    pairs = len(pts) * len(prompts)
    default_pairs = len(pts) * (cfg.route.prompts or 64) * len(cfg.route.seeds)
    return {"model": cfg.model.name, "points": len(pts), "prompts": len(prompts), "seconds": round(sec, 2),
            "s_per_pair": round(sec / pairs, 4), "max_new_tokens": cfg.eval.generation.max_new_tokens,
            "default_pairs": default_pairs, "default_estimate_s": round(sec / pairs * default_pairs, 1)}


def compare(args: argparse.Namespace) -> dict:
    from emorl.config import load_run_config
    from emorl.models import load_base
    from emorl.rewards import build_rewards
    from emorl.router.compare import compare_run
    from emorl.router.run import fit_run

    cfg = load_run_config(args.run)
    base = load_base(cfg.model)
    rewards = build_rewards(cfg.objectives, base)
    t0 = time.perf_counter()
    _, meta = fit_run(args.run, cfg, base=base, rewards=rewards)
    t_fit = time.perf_counter() - t0
    prompts = None
    if args.prompts:  # the first N of the evaluation's test prompts (the comparison decodes ~18 points per prompt)
        from emorl.methods import eval_prompts

        prompts = eval_prompts(cfg, "test")[:args.prompts]
    rep = compare_run(args.run, cfg, base=base, rewards=rewards, prompts=prompts)
    return {"fit_s": round(t_fit, 1), "compare_s": round(time.perf_counter() - t0 - t_fit, 1), "fit": meta["fit"],
            **{k: v for k, v in rep.items() if k != "weights"}}


def synthetic(args: argparse.Namespace) -> dict:
    """Two prompt groups (embeddings around two directions) whose rewards peak at different weights; the router is
    fitted on 40 training prompts and compared on 40 test prompts with noisy per-seed scores."""
    from emorl.router.compare import summarise
    from emorl.router.data import Block, RouterData, simplex_lattice
    from emorl.router.fit import fit_router

    rng = np.random.default_rng(0)
    opt = np.array([[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]])
    pts = simplex_lattice(3, 0.25)

    def prompts(n: int) -> tuple[np.ndarray, np.ndarray]:
        grp = np.arange(n) % 2
        e = np.eye(16)[grp] + rng.normal(0, 0.05, (n, 16))
        return e / np.linalg.norm(e, axis=1, keepdims=True), grp

    def reward(w: np.ndarray, grp: np.ndarray, seeds: int) -> np.ndarray:  # (P, S, B, 1)
        base = 1 - ((w[:, None, :] - opt[grp][None]) ** 2).sum(-1)  # (P, B)
        return (base[:, None, :] + rng.normal(0, 0.05, (len(w), seeds, len(grp))))[..., None]

    e_tr, g_tr = prompts(40)
    data = RouterData(["a", "b", "c"], ["r"], [Block([str(i) for i in range(40)], pts, reward(pts, g_tr, 1))])
    out = {}
    for method in ("knn", "ridge"):
        router = fit_router(data, [e_tr], np.ones(1), method=method)
        e_te, g_te = prompts(40)
        w, far = router.predict(e_te)
        rows = np.vstack([np.zeros((1, 3)), router.global_weights[None], np.full((1, 3), 1 / 3), pts])
        table = reward(rows, g_te, 3)
        r_own = reward(w, g_te, 3)  # each prompt's own routed weights: take the diagonal
        table[0] = r_own[np.arange(40), :, np.arange(40)].T[..., None]
        out[method] = {"cv": router.info["cv"], "fallback": int(far.sum()),
                       "results": summarise(table, ["r"], np.ones(1), reps=2000)["mean_reward"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="folder for router_<what>.json")
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--preset", default="default")
    c.add_argument("--model")
    c.add_argument("--prompts", type=int, default=8)
    r = sub.add_parser("compare")
    r.add_argument("--run", required=True)
    r.add_argument("--prompts", type=int, default=None, help="first N test prompts (default: the evaluation's)")
    sub.add_parser("synthetic")
    args = ap.parse_args()
    res = {"cost": cost, "compare": compare, "synthetic": synthetic}[args.what](args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"router_{args.what}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark of the weight search.

Part 1 (``--part complexity``, seconds): evaluation counts of the hierarchical search vs a full grid at the
same resolution for d = 2..5, measured by counting objective calls on an analytic objective (the full grid is
run where it has at most ``--max-grid`` points and counted by formula beyond), and the paper's complexity
figure redrawn from those counts.

Part 2 (``--part real``, minutes): on the default model (SmolLM2-135M-Instruct, K=3 adapters, hidden-state
mixing, greedy), our search (memo, direction dedup, all new points of a round decoded in batches that share
the prompt prefill) vs a naive one as in the reference code (every round's 27 points scored one at a time, no
memo, no shared prefill, no batching of points), on the same validation prompts: wall time, weight points
decoded and decoder forward calls, side by side, and whether both return the same best point.

    python bench/search.py                       # both parts
    python bench/search.py --part real --prompts 4 --tokens 8
    python bench/search.py --quick --out DIR     # smoke run: small grids, the real part on the tiny random model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from emorl.search import expected_evaluations, grid_search, hierarchical_search  # noqa: E402
from emorl.search.plots import plot_complexity  # noqa: E402

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------------------ part 1

def complexity(max_grid: int, out: Path) -> list[dict]:
    rows = []
    print("\n## Evaluation counts: hierarchical (memo) vs reference (no memo) vs full grid, same resolution")
    print(f"{'d':>2} {'rounds':>6} {'per axis':>8} {'hierarchical':>12} {'reference':>9} {'full grid':>12} "
          f"{'grid/hier':>10}  grid count")
    for d in range(2, 6):
        for n in range(1, 8):
            calls, peak = [0], np.linspace(0.2, 0.8, d)

            def f(points, calls=calls, u=peak):
                calls[0] += len(points)
                return -((points - u) ** 2).sum(1)

            hierarchical_search(f, d, n, progress=False, batch_points=4096)
            hier = calls[0]
            assert hier == expected_evaluations(d, n)
            per_axis = 2**n + 1
            grid_n = per_axis**d
            how = "formula"
            if grid_n <= max_grid:
                calls[0] = 0
                grid_search(f, d, per_axis, progress=False, batch_points=4096)
                assert calls[0] == grid_n
                how = "measured"
            rows.append({"dim": d, "iterations": n, "per_axis": per_axis, "hierarchical": hier,
                         "reference": n * 3**d, "grid": grid_n, "grid_counted": how})
            print(f"{d:>2} {n:>6} {per_axis:>8} {hier:>12} {n * 3**d:>9} {grid_n:>12} {grid_n / hier:>10.1f}  {how}")
    plot_complexity(rows, out)
    print(f"figure: {out}")
    return rows


# ------------------------------------------------------------------------------------------ part 2

def build_run(folder: Path, cfg) -> Path:  # noqa: ANN001
    """A run folder with K=3 deterministic random adapters on the default model (B ~ N(0, 0.01), as in
    research/anchor-measurements.md): the search's cost does not depend on how the adapters were trained."""
    from emorl.models import load_base, save_random_adapters

    cfg.save(folder / "config.yaml")
    save_random_adapters(load_base(cfg.model), cfg.trained_objectives(), cfg.lora, folder / "adapters", std=0.01,
                         seed=1000)
    return folder


class ForwardCounter:
    """Counts forward calls of the decoder backbone while a generate call runs (not the rewards' forwards)."""

    def __init__(self, ensemble) -> None:  # noqa: ANN001
        self.n = 0
        self.calls = 0
        self.seconds = 0.0
        self.active = False
        ensemble.stream.decoder.register_forward_hook(self._hook)
        inner = ensemble.generate

        def generate(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            self.active, self.calls = True, self.calls + 1
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.active = False
                self.seconds += time.perf_counter() - t0

        ensemble.generate = generate

    def _hook(self, *_: object) -> None:
        if self.active:
            self.n += 1


def naive_search(objective, dim: int, iterations: int) -> tuple[list[float], float, int]:  # noqa: ANN001
    """The reference code's search: every round's 3^d points scored one at a time (one generate call each, so
    one prefill each), no memo, no direction reuse. The all-zero point cannot be decoded (the ensemble refuses
    it) and gets the same degenerate score as in our search, at no cost. Returns (best w, best, points decoded)."""
    import itertools

    lo, side = [0.0] * dim, 1.0
    best_w, best, decoded = None, -np.inf, 0
    for _ in range(iterations):
        axes = [[lo[i], lo[i] + side / 2, lo[i] + side] for i in range(dim)]
        pts = list(itertools.product(*axes))
        vals = []
        for p in pts:
            if any(p):
                vals.append(objective(np.array([p]))[0].aggregate)
                decoded += 1
            else:
                vals.append(objective.degenerate().aggregate)
            if vals[-1] > best:
                best_w, best = list(p), vals[-1]
        table = dict(zip(itertools.product(range(3), repeat=dim), vals, strict=True))
        sums = {o: sum(table[tuple(a + b for a, b in zip(o, c, strict=True))]
                       for c in itertools.product((0, 1), repeat=dim)) for o in itertools.product((0, 1), repeat=dim)}
        o = max(sums, key=lambda k: sums[k])
        lo, side = [lo[i] + o[i] * side / 2 for i in range(dim)], side / 2
    return best_w, best, decoded


def real_comparison(args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    from emorl.config import load_config
    from emorl.data import load_splits
    from emorl.ensemble import EnsembleModel
    from emorl.rewards import build_rewards
    from emorl.search.objective import EnsembleObjective

    torch.set_num_threads(2)
    cfg = load_config("default", [f"search.generation.max_new_tokens={args.tokens}",
                                  f"search.generation.min_new_tokens={args.tokens}",
                                  *(["model.name=tiny-llama"] if args.quick else [])])
    run = build_run(Path(tempfile.mkdtemp(prefix="emorl-bench-search-")), cfg)
    ens = EnsembleModel.from_run(run)
    counter = ForwardCounter(ens)
    prompts = [r.prompt for r in load_splits(cfg.data).validation[: args.prompts]]
    rewards = build_rewards(cfg.objectives, ens.base)
    obj = EnsembleObjective(ens, prompts, rewards, mode="hidden", generation=cfg.search.generation)
    obj(np.array([[1.0, 0.5, 0.25]]))  # warm-up (head check, reward models, allocator)
    n_adapters = len(ens.names)
    print(f"\n## Real model: SmolLM2-135M-Instruct, K={n_adapters} adapters, hidden mixing, greedy, {args.iterations} "
          f"rounds, {len(prompts)} validation prompts, {args.tokens} new tokens (EOS suppressed)")
    runs: dict[str, list[dict]] = {"ours": [], "naive": []}
    # ours runs before and after the naive search, so a change of the shared machine's load shows up
    order = [w for _ in range(args.repeats) for w in ("ours", "naive")] + ["ours"]
    for rep, which in enumerate(order):
        counter.n = counter.calls = 0
        counter.seconds = 0.0
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        if which == "ours":
            res = hierarchical_search(obj, n_adapters, args.iterations, scale_invariant=True, progress=False,
                                      batch_points=args.batch_points)
            w, best, decoded = res.weights, res.aggregate, res.n_decoded
        else:
            w, best, decoded = naive_search(obj, n_adapters, args.iterations)
        wall = time.perf_counter() - t0
        row = {"wall_s": wall, "decode_s": counter.seconds, "points_decoded": decoded,
               "generate_calls": counter.calls, "decoder_forwards": counter.n, "best_weights": w, "best": best,
               "load1": load0, "load1_end": os.getloadavg()[0]}
        runs[which].append(row)
        print(f"  run {rep + 1} {which:>5}: {wall:8.1f} s ({counter.seconds:.1f} s decoding), {decoded:4d} "
              f"points decoded, {counter.calls:4d} generate calls, {counter.n:5d} decoder forwards, "
              f"best {best:.4f} at {w} (load {load0:.2f} -> {row['load1_end']:.2f})")
    keys = ("wall_s", "decode_s", "points_decoded", "generate_calls", "decoder_forwards")
    med = {w: {k2: statistics.median(r[k2] for r in rs) for k2 in keys} for w, rs in runs.items()}
    print("\n| | ours | naive | naive / ours |\n|---|---|---|---|")
    for key in keys:
        o, n = med["ours"][key], med["naive"][key]
        print(f"| {key} (median) | {o:.1f} | {n:.1f} | {n / o:.2f} |")
    o, n = runs["ours"][0], runs["naive"][0]
    same = o["best_weights"] == n["best_weights"]
    print(f"same best point: {same} (ours {o['best_weights']} scores {o['best']:.6f}, naive {n['best_weights']} scores "
          f"{n['best']:.6f}; replies are scored in different batches, so equal decodes can differ by float noise)")
    return {"prompts": len(prompts), "tokens": args.tokens, "iterations": args.iterations,
            "batch_points": args.batch_points, "runs": runs, "median": med, "same_best": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "complexity", "real"], default="all")
    ap.add_argument("--max-grid", type=int, default=50_000, help="run the full grid up to this many points")
    ap.add_argument("--prompts", type=int, default=2, help="validation prompts per weight point (real part)")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per reply (real part; EOS suppressed)")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch-points", type=int, default=32, help="our search: points decoded together")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of each search (median reported)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--quick", action="store_true", help="smoke run: grids <= 500 points, 2 rounds of 1 prompt x 2 "
                                                         "tokens on the tiny random model")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for search_complexity.png")
    args = ap.parse_args()
    if args.quick:
        args.max_grid, args.iterations, args.prompts, args.tokens = 500, 2, 1, 2
    results: dict = {"load_avg_start": os.getloadavg()}
    if args.part in ("all", "complexity"):
        results["complexity"] = complexity(args.max_grid, args.out / "search_complexity.png")
    if args.part in ("all", "real"):
        results["real"] = real_comparison(args)
    results["load_avg_end"] = os.getloadavg()
    print(f"\nload average at start {results['load_avg_start']}, at end {results['load_avg_end']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is a hidden-state mix flatter than its parts? Mean entropy of the next-token distribution along greedy
decodes of test prompts, for a weight point of a finished run vs each adapter alone and the uniform mix.

    python bench/mix_entropy.py runs/default_crn --weights 0.375,0.25,0.375
"""

from __future__ import annotations

import argparse

import torch

from emorl.config import load_config
from emorl.data import load_splits
from emorl.ensemble import EnsembleModel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--weights", required=True, help="the mix to inspect, comma-separated (one per adapter)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    cfg = load_config(f"{args.run}/config.yaml")
    ens = EnsembleModel.from_run(args.run)
    prompts = [r.prompt for r in load_splits(cfg.data).test[: args.prompts]]
    n = ens.n_adapters
    points = {f"mix {args.weights}": [float(x) for x in args.weights.split(",")], "uniform mix": [1 / n] * n}
    points.update({name: [1.0 if j == i else 0.0 for j in range(n)] for i, name in enumerate(ens.names)})
    res = ens.generate(prompts, list(points.values()), mode="hidden", max_new_tokens=args.tokens, output_scores=True,
                       anchor="none")
    for g, name in enumerate(points):
        lp = torch.log_softmax(res.scores[g].float(), -1)  # (B, T, V)
        ent = -(lp.exp() * lp).sum(-1)
        live = torch.arange(lp.shape[1])[None, :] < res.lengths[g][:, None]
        print(f"{name:>28}: mean entropy {float(ent[live].mean()):.3f} nats, "
              f"mean top probability {float(lp.exp().amax(-1)[live].mean()):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which ``max_tokens`` lets served replies finish: the share of a run's replies that end with EOS within L new
tokens, for EMORL's searched weights and for the base model, on the test split (serving's default comes from this).

    python bench/serve_finish.py --run runs/default --prompts 32 --max-tokens 512
    python bench/serve_finish.py --quick        # 2 prompts, 16 tokens, on a tiny random run in a temp folder

Decodes ``--prompts`` test statements once at ``--max-tokens`` with the run's evaluation settings
(``eval.generation``: sampling, temperature, top-k/p, seed) and counts, for each L, the replies whose EOS came
within L tokens; prints the smallest L at which both reach ``--target`` (95%).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import bench_parser, run_folder  # noqa: E402


def main() -> int:
    ap = bench_parser(__doc__, "2 prompts, 16 new tokens")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--target", type=float, default=0.95)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_tokens = 2, 16
    with run_folder(args, ap) as run:
        out = measure(run, args.prompts, args.max_tokens, args.target)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


def measure(run: Path, prompts_n: int, max_tokens: int, target: float) -> dict[str, object]:
    """Decode the test prompts once for EMORL's weights and for the base; the EOS-ended share at each L."""
    from emorl.config import load_config
    from emorl.data import load_splits
    from emorl.ensemble import EnsembleModel
    from emorl.models import load_base

    cfg = load_config(run / "config.yaml")
    best = json.loads((run / "search" / "hidden" / "best.json").read_text())
    ens = EnsembleModel.from_run(run, base=load_base(cfg.model))
    prompts = [r.prompt for r in load_splits(cfg.data).test[:prompts_n]]
    gen = cfg.eval.generation
    settings = dict(max_new_tokens=max_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                    top_k=gen.top_k, top_p=gen.top_p, seed=cfg.eval.seeds[0])
    weights = [float(best["weights"][n]) for n in ens.names]
    methods = {"emorl": (weights, best.get("anchor", "base")), "base": ([0.0] * len(ens.names), "base")}
    lengths = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024]
    out: dict[str, object] = {"prompts": len(prompts), "max_tokens": max_tokens, "settings": settings,
                              "weights": dict(zip(ens.names, weights, strict=True))}
    for name, (w, anchor) in methods.items():
        t0 = time.perf_counter()
        res = ens.generate(prompts, w, anchor=anchor, **settings)
        ids, n = res.token_ids, res.lengths
        eos = [int(n[i]) if int(ids[i, int(n[i]) - 1]) in ens.eos else None for i in range(len(prompts))]
        share = {cap: float(np.mean([e is not None and e <= cap for e in eos])) for cap in lengths
                 if cap <= max_tokens}
        out[name] = {"eos_share": share, "median_eos_length": float(np.median([e for e in eos if e] or [0])),
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(name, out[name], flush=True)
    ok = [cap for cap in lengths if cap <= max_tokens and all(
        out[m]["eos_share"][cap] >= target for m in methods)]  # type: ignore[index]
    out["smallest_max_tokens"] = ok[0] if ok else None
    print("smallest max_tokens with >= {:.0%} EOS-ended replies for both: {}".format(target, out[
        "smallest_max_tokens"]))
    return out


if __name__ == "__main__":
    sys.exit(main())

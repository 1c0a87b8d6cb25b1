"""Choosing the default KL coefficient by measurement.

    python bench/kl_coef.py [--coefs 0,0.05,0.2] [--steps 12] [--objective empathy]

Trains one objective's adapter on the default model with each KL coefficient (same seed, same prompts) and
reports the validation gain (last − first validation mean of the objective), the KL to the base over the last
steps (the trainer's k3 estimate, summed over a reply's tokens; "0" runs with 1e-9 so the KL is measured but has no
effect), and the fluency of the replies (likelihood under the base), which is what a KL penalty protects.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coefs", default="0,0.05,0.2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--objective", default="empathy")
    ap.add_argument("--out", default="/tmp/emorl-bench-kl")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "kl_coef.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps at coefs 0 and 0.05, tiny random model")
    a = ap.parse_args()
    if a.quick:
        a.coefs, a.steps = "0,0.05", 2

    from emorl.config import load_config
    from emorl.models import load_base
    from emorl.rewards import build_rewards
    from emorl.train.trainer import Trainer

    rows = []
    base = None
    rewards = None
    for coef in [float(c) for c in a.coefs.split(",")]:
        cfg = load_config("default", [
            f"train.objectives=[{a.objective}]", "train.strategy=single", f"train.max_steps={a.steps}",
            f"train.kl_coef={max(coef, 1e-9)}", "train.val_every=4", "train.val_prompts=16",
            "train.checkpoint_every=1000", "train.convergence_threshold=0", "front.sweep=[]",
            *(["model.name=tiny-llama", "train.val_every=1", "train.val_prompts=2"] if a.quick else [])])
        if base is None:
            base = load_base(cfg.model)
            rewards = build_rewards(cfg.objectives, base)
        run = Path(a.out) / f"kl{coef}"
        t0 = time.time()
        tr = Trainer(cfg, run, base=base, rewards=rewards, progress=False, force=True,
                     val_objectives=[a.objective, "fluency"])
        info = tr.train()[a.objective]
        recs = [json.loads(x) for x in (run / "logs" / f"single-{a.objective}.jsonl").read_text().splitlines()]
        kls = [r["kl"] for r in recs if "kl" in r]
        first, last = info.curve[0]["scores"], info.curve[-1]["scores"]
        rows.append({"kl_coef": coef, "gain": last[a.objective] - first[a.objective], "start": first[a.objective],
                     "end": last[a.objective], "kl_last": statistics.mean(kls[-4:]) if kls else None,
                     "fluency_start": first.get("fluency"), "fluency_end": last.get("fluency"),
                     "time_s": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
        base.model.delete_adapter(a.objective)
    print(f"\n{'kl_coef':>8} {'start':>7} {'end':>7} {'gain':>7} {'KL/tok-sum':>10} {'flu start':>9} {'flu end':>8}")
    for r in rows:
        print(f"{r['kl_coef']:>8} {r['start']:7.3f} {r['end']:7.3f} {r['gain']:+7.3f} {r['kl_last'] or 0:10.3f} "
              f"{r['fluency_start']:9.3f} {r['fluency_end']:8.3f}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Loading and memory on a device: where the base and the reward models land (device, dtype), and emorl.memory's
estimate beside what CUDA's allocator measured: after loading the base, and at the peak of a K-adapter decode.

    python bench/memory.py --run RUN --device cuda --dtype bfloat16 --json out.json
    python bench/memory.py --quick          # the tiny model on the CPU (what the test suite runs)

On the CPU there is no allocator to ask: the script reports dtypes, devices and the estimate only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emorl.config import load_config
from emorl.memory import GIB, decoding, run_config_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run folder (its config and adapters); default: the preset's config, no adapters")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=16, help="requests decoded at once (each K + 1 streams)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="the tiny preset on the CPU, 2 prompts, 4 tokens")
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args()
    if a.quick:
        a.preset, a.device, a.dtype, a.prompts, a.tokens, a.run = "tiny", "cpu", "float32", 2, 4, None
    from emorl.models import load_base
    from emorl.rewards import build_rewards

    cfg = load_config(Path(a.run) / "config.yaml") if a.run else load_config(a.preset)
    cfg.model.device, cfg.model.dtype = a.device, a.dtype
    cuda = torch.device(a.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    base = load_base(cfg.model)
    out: dict = {"device": a.device, "dtype": a.dtype, "load_s": round(time.perf_counter() - t0, 2),
                 "base": sorted({f"{p.device.type}/{p.dtype}" for p in base.model.parameters()})}
    shape = run_config_shape(cfg)
    n = len(cfg.objectives)
    prompt_tokens = cfg.model.max_prompt_tokens
    est = decoding(shape, dtype=a.dtype, adapters=n if a.run else 0, r=cfg.lora.r, streams=a.prompts * (n + 1),
                   tokens=prompt_tokens + a.tokens)
    out["estimate_gib"] = est.gib()
    if cuda:
        out["measured_after_load_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    rewards = build_rewards(cfg.objectives, base)
    models = {}
    for name, r in rewards.items():
        if hasattr(r, "load"):
            r.load()
        m = getattr(r, "model", None) or getattr(getattr(r, "encoder", None), "model", None)
        if m is not None and hasattr(m, "parameters"):
            models[name] = sorted({f"{p.device.type}/{p.dtype}" for p in m.parameters()})
    out["reward_models"] = models
    if a.run:
        from emorl.ensemble import EnsembleModel

        ens = EnsembleModel.from_run(a.run, base=base)
        prompts = [f"Statement {i}: I lost my job and I do not know how to tell my family." for i in range(a.prompts)]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ens.generate(prompts, [1.0] * n, mode="hidden", max_new_tokens=a.tokens, do_sample=True, seed=0)
        out["decode_s"] = round(time.perf_counter() - t0, 2)
        if cuda:
            out["measured_decode_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Adapters on the top layers vs every layer (issue 24): decode throughput of the mix and cost of a training step,
measured side by side in one process (interleaved repeats, so a drifting load hits both alike).

Setup: SmolLM2-135M-Instruct (the default model, fp32), K=3 LoRA adapters per depth (r=8, alpha=32 on every linear
layer of the chosen decoder layers; A as peft initialises it, B ~ N(0, 0.01): random-init adapters, fine for speed),
one set on all 30 layers and one on the top third (``lora.layers: top:1/3`` = layers 20-29).

  decode:  the base-anchored K=3 hidden mix (K+1 = 4 streams, weights (0.78, 0.5, 0.06)) ÷ one adapter alone
           (one-hot, 1 stream), both through EnsembleModel.generate, at B=16 and at the evaluation's batch (the
           default preset's 100 test prompts, 24 new tokens sampled with top-k 50: eval.generation); min_new_tokens
           fixes every reply's length, so both do the same number of steps. With the top-third adapters the mix runs
           layers 0-19 once per prompt (the shared trunk); ``--no-trunk`` also times the mix with every stream
           through every layer.
  train:   one k-SCST loss step (forward + backward of the reply log-probs, the trainer's
           ``causal_token_logprobs``) of 8 prompts x k=3 x 48 tokens: time and the activations autograd keeps for
           the backward pass (bytes saved by the forward: ``torch.autograd.graph.saved_tensors_hooks``).

    python bench/trunk.py                  # B=16 and B=100, 3 repeats (about 15 min on a loaded 2-core CPU)
    python bench/trunk.py --quick          # the tiny model, B=4, 4 tokens: a smoke run of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
WEIGHTS = [0.78, 0.5, 0.06]
DEPTHS = {"full": "all", "top": "top:1/3", "quarter": "top:1/4", "half": "top:1/2"}  # the depth study's four


def build(model: str, depths: list[str]) -> tuple[Any, Any]:
    """One base with K=3 adapters per depth of ``depths`` (names full0.., top0.., ...), full and top always."""
    from emorl.config import LoraConfig, ModelConfig
    from emorl.ensemble import EnsembleModel
    from emorl.models import add_adapters, load_base

    base = load_base(ModelConfig(name=model, tiny_layers=6))  # the default system prompt, as the evaluation
    for depth, spec in DEPTHS.items():
        if depth not in {"full", "top", *depths}:
            continue
        for i in range(3):
            n = f"{depth}{i}"
            add_adapters(base, [n], LoraConfig(r=8, alpha=32, dropout=0.0, layers=spec), seed=1000 + i)
            g = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for pname, p in base.model.named_parameters():
                    if f"lora_B.{n}." in pname:
                        p.normal_(0.0, 0.01, generator=g)
    return base, EnsembleModel(base, None, require_metadata=False)


def point(ens: Any, depth: str, w: list[float]) -> list[float]:
    """The K=6 weight vector that uses only ``depth``'s adapters (unused adapters are left out of the batch)."""
    return [w[int(n[-1])] if n.startswith(depth) else 0.0 for n in ens.names]


def decode_bench(ens: Any, prompts: list[str], tokens: int, repeats: int, no_trunk: bool,
                 depths: list[str]) -> dict[str, Any]:
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": True, "top_k": 50, "seed": 0}
    runs: dict[str, Any] = {}
    for depth in depths:
        runs[f"mix-{depth}"] = lambda d=depth: ens.generate(prompts, point(ens, d, WEIGHTS), **kw)
        runs[f"single-{depth}"] = lambda d=depth: ens.generate(prompts, point(ens, d, [1.0, 0.0, 0.0]), **kw)
    if no_trunk:
        def every_layer() -> Any:
            ens.share_trunk = False
            try:
                return ens.generate(prompts, point(ens, "top", WEIGHTS), **kw)
            finally:
                ens.share_trunk = True
        runs["mix-top-no-trunk"] = every_layer
    ens.generate(prompts[:2], point(ens, depths[0], WEIGHTS), max_new_tokens=2)  # warm-up, untimed
    times: dict[str, list[float]] = {k: [] for k in runs}
    trunk: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            trunk[name] = res.stats.get("trunk_layers", 0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"times": times, "median": med, "trunk_layers": trunk,
                           "tokens_per_s": {k: len(prompts) * tokens / v for k, v in med.items()}}
    out["mix/single"] = {d: med[f"mix-{d}"] / med[f"single-{d}"] for d in depths}
    if "full" in depths and "top" in depths:
        out["mix-top/single-full"] = med["mix-top"] / med["single-full"]
    if no_trunk:
        out["no-trunk/trunk"] = med["mix-top-no-trunk"] / med["mix-top"]
    return out


def train_bench(base: Any, steps: int, prompts: int, k: int, tokens: int) -> dict[str, Any]:
    from emorl.train.kscst import RolloutBatch, causal_token_logprobs

    model = base.model
    g = torch.Generator().manual_seed(0)
    vocab = model.get_base_model().config.vocab_size
    batch = RolloutBatch(torch.randint(0, vocab, (prompts, 40), generator=g), torch.ones(prompts, 40, dtype=torch.long),
                         torch.randint(0, vocab, (prompts * k, tokens), generator=g),
                         torch.ones(prompts * k, tokens), k)
    adv = torch.randn(prompts * k, generator=g)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    def step(name: str) -> tuple[float, int]:
        model.set_adapter(name)  # peft: only the active adapter is trainable
        model.train()
        saved[0] = 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp = causal_token_logprobs(model, batch)
        loss = -(logp.sum(1) * adv).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, saved[0]

    names = {d: f"{d}0" for d in ("full", "top")}
    step(names["full"])  # warm-up
    times: dict[str, list[float]] = {d: [] for d in names}
    kept: dict[str, int] = {}
    for _ in range(steps):
        for d, n in names.items():
            t, b = step(n)
            times[d].append(t)
            kept[d] = b
    model.eval()
    med = {d: statistics.median(v) for d, v in times.items()}
    return {"times": times, "median": med, "saved_bytes": kept, "time top/full": med["top"] / med["full"],
            "saved top/full": kept["top"] / kept["full"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,100", help="prompt counts to decode (comma-separated)")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per reply (the evaluation's 24)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3, help="timed loss steps per depth; 0 skips training")
    ap.add_argument("--depths", default="full,top", help="adapter depths to decode, comma-separated: full (all "
                    "layers), top (top third), quarter (top quarter), half (top half)")
    ap.add_argument("--no-trunk", action="store_true", help="also time the top-third mix without the shared trunk")
    ap.add_argument("--quick", action="store_true", help="tiny model, B=4, 4 tokens, 1 repeat (smoke test)")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    model = "default"
    if args.quick:
        model, args.batches, args.tokens, args.repeats, args.train_steps = "tiny-llama", "4", 4, 1, 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from emorl.data import default_records

    depths = args.depths.split(",")
    bad = [d for d in depths if d not in DEPTHS]
    if bad:
        raise SystemExit(f"--depths: unknown {bad}; choose from {list(DEPTHS)}")
    base, ens = build(model if model != "default" else _default_name(), depths)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    res: dict[str, Any] = {"commit": commit.strip(), "machine": f"{platform.processor() or platform.machine()}, "
                           f"{os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}",
                           "load_start": os.getloadavg()}
    print(f"# {res['machine']}; commit {res['commit']}; load average at start {res['load_start']}")
    statements = [r.prompt for r in default_records()]
    for b in [int(x) for x in args.batches.split(",")]:
        r = decode_bench(ens, statements[:b], args.tokens, args.repeats, args.no_trunk, depths)
        res[f"decode B={b}"] = r
        print(f"decode B={b}, {args.tokens} tokens: medians " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                                          r["median"].items()))
        print("  mix/single: " + ", ".join(f"{d} {v:.2f}" for d, v in r["mix/single"].items())
              + f" (trunk layers {r['trunk_layers']})"
              + (f"; top-third mix / full-depth single {r['mix-top/single-full']:.2f}"
                 if "mix-top/single-full" in r else "")
              + (f"; no trunk / trunk {r['no-trunk/trunk']:.2f}" if args.no_trunk else ""))
    if args.train_steps:
        r = train_bench(base, args.train_steps, 8, 3, 48 if not args.quick else 8)
        res["train"] = r
        print(f"train loss step (8 prompts x k=3 x 48 tokens): full {r['median']['full']:.2f} s, top third "
              f"{r['median']['top']:.2f} s, ratio {r['time top/full']:.2f}; activations kept for backward: full "
              f"{r['saved_bytes']['full'] / 2**20:.0f} MiB, top third {r['saved_bytes']['top'] / 2**20:.0f} MiB, "
              f"ratio {r['saved top/full']:.2f}")
    res["load_end"] = os.getloadavg()
    print(f"# load average at end {res['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def _default_name() -> str:
    from emorl.config import ModelConfig

    return ModelConfig().name


if __name__ == "__main__":
    sys.exit(main())

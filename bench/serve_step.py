"""Decode-step time of ``emorl serve``'s running batch: the per-row LoRA mode now (``lora_bank.RowPlan``: one gather,
one bmm pair and an in-place ``index_add_`` per LoRA layer) beside the previous one (a gather, zero padding, a bmm
pair and a scatter per adapter group, plus a zero-filled delta per layer: commit 0aa08a1's ``_row_delta``, copied
below as ``old_delta_into``), and the running batch's KV cache now (``serve.batch.RunningCache``: grown in blocks)
beside transformers' ``DynamicCache`` (a ``torch.cat`` of the whole cache per layer and step), side by side in one
process on the same rows and the same prefilled KV.

The rows are those of the step scheduler's batch (seq-contiguous, so adapters interleave): per copy, 8 requests —
two base-anchored hidden mixes (4 and 3 rows), a convex hidden mix (2), a logits mix (3), two parameter mixes (1
each), a baseline adapter alone (1) and the base (1): 16 rows. Each timed run copies the prefilled KV cache and
times ``--steps`` decode forwards (the backbone, as ``Runner._forward``); the paths alternate, ``--repeats`` times,
and every step's hidden states of the paths are compared bit for bit. Paths: ``old`` (both as before), ``lora``
(the new delta, the old cache), ``new`` (both new), ``base`` (no LoRA delta at all, every row the base: not a
reply, a floor that shows the deltas' share of the step).

    python bench/serve_step.py --run /work/runs/default --copies 1,4   # 16 and 64 rows, the real model (float32)
    python bench/serve_step.py --quick                                 # the tiny random model: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from emorl.lora_bank import lora_bank, pad_rows, safe_rows
from emorl.models import cache_kwarg, output_cache

# --------------------------------------------------------------------------------- the previous per-row delta


def _old_plan(bank: Any) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None]:
    plan = getattr(bank, "_old_plan", None)
    if plan is None or plan[0] is not bank.row_weights:
        w = bank.row_weights
        nz = w != 0
        hot = nz.sum(1) == 1
        one = hot & (w.max(1).values == 1)
        groups = [(i, torch.nonzero(one & nz[:, i])[:, 0].to(w.device)) for i in range(w.shape[1])]
        groups = [(i, idx) for i, idx in groups if len(idx)]
        mixed = torch.nonzero(~one & nz.any(1))[:, 0]
        plan = bank._old_plan = (w, (groups, mixed if len(mixed) else None))
    return plan[1]


def _old_row_delta(bank: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r_max: int) -> torch.Tensor:
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
    t = flat.shape[1]
    out = flat.new_zeros(rows, t, b.shape[-1])
    groups, mixed = _old_plan(bank)
    for i, idx in groups:
        m = len(idx) * t
        xg = pad_rows(flat[idx].reshape(1, m, -1), 1, safe_rows(m))
        out[idx] = torch.bmm(torch.bmm(xg, a[i:i + 1]), b[i:i + 1].to(xg.dtype))[0, :m].view(len(idx), t, -1)
    if mixed is not None:
        n_adapters = len(bank.names)
        xg = pad_rows(flat[mixed], 1)
        xa = xg @ a.permute(1, 0, 2).reshape(a.shape[1], n_adapters * r_max)
        c = bank.row_weights[mixed].to(device=xa.device, dtype=xa.dtype).repeat_interleave(r_max, dim=1)
        out[mixed] = ((xa * c[:, None, :]) @ b.reshape(n_adapters * r_max, b.shape[-1]).to(xa.dtype))[:, :t]
    return out


def old_delta_into(bank: Any, mod: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The per-row branch of ``LoraBank.delta_into`` before RowPlan (per-row mode only)."""
    stack = bank._stacks[id(mod)]
    if stack is None:
        return result
    a, b, r_max = stack
    delta = _old_row_delta(bank, x, a, b, r_max).reshape(result.shape).to(result.dtype)
    return result.add_(delta) if not torch.is_grad_enabled() else result + delta


def no_delta(bank: Any, mod: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """No LoRA delta at all (every row the base): the floor the per-row deltas add to."""
    return result


# --------------------------------------------------------------------------------- the model and the rows


def load(run: str | None) -> tuple[Any, list[str], int]:
    """The peft model in float32 with the run's objective adapters and baselines (``--quick``: the tiny random
    model with 3 random adapters and a 'uniform' one); returns (model, adapter names, objectives)."""
    from emorl.config import load_config
    from emorl.models import add_adapters, load_adapters, load_base

    if run is None:
        cfg = load_config("tiny")
        base = load_base(cfg.model)
        names = ["short", "long", "fluency", "uniform"]
        model = add_adapters(base, names, cfg.lora)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.3, generator=g)
        return model, names, 3
    cfg = load_config(Path(run) / "config.yaml")
    cfg.model.dtype = "float32"
    cfg.model.device = "cpu"
    base = load_base(cfg.model)
    objectives = cfg.trained_objectives()
    folders = {o: Path(run) / "adapters" / o for o in objectives}
    folders.update({p.name: p for p in sorted((Path(run) / "baselines").glob("*"))
                    if (p / "adapter_model.safetensors").exists()})
    model, _ = load_adapters(base, folders)
    return model, list(folders), len(objectives)


def row_coefs(n_adapters: int, n_objectives: int, copies: int) -> torch.Tensor:
    """(rows, n_adapters) LoRA coefficients of ``copies`` x 8 requests laid out as the step scheduler lays them."""
    from emorl.serve.scheduler import stream_coefs

    def pad(w: list[float]) -> list[float]:
        return w + [0.0] * (n_adapters - len(w))

    requests = [("hidden+base", [0.5, 0.3, 0.2]), ("hidden+base", [0.7, 0.0, 0.4]), ("hidden", [0.0, 1.0, 0.5]),
                ("params", [0.3, 0.3, 0.4]), ("params", [0.6, 0.2, 0.1]), ("hidden", [0.0] * n_objectives + [1.0]),
                ("params", [0.0]), ("logits", [0.2, 0.5, 0.3])]
    coefs = [stream_coefs(key, pad(w), n_adapters)[0] for key, w in requests]
    return torch.cat(coefs * copies)


def copy_cache(cache: Any, kind: type) -> Any:
    out = kind()
    for li, layer in enumerate(cache.layers):
        out.update(layer.keys.clone(), layer.values.clone(), li)
    return out


def time_steps(decoder: Any, bank: Any, coef: torch.Tensor, cache: Any, mask: torch.Tensor, steps: int,
               gen: torch.Generator, kind: type) -> tuple[list[float], list[torch.Tensor]]:
    """``steps`` decode forwards from a copy of ``cache`` (as a ``kind`` cache): each step's seconds and last
    hidden states."""
    cache = copy_cache(cache, kind)
    n = coef.shape[0]
    pos = mask.sum(1)
    secs, hs = [], []
    for _ in range(steps):
        ids = torch.randint(0, 1000, (n, 1), generator=gen)
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            bank.set_row_weights(coef)
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                          **{cache_kwarg(decoder): cache})
        secs.append(time.perf_counter() - t0)
        cache, pos = output_cache(out), pos + 1
        hs.append(out.last_hidden_state[:, -1].clone())
    return secs, hs


def bench(model: Any, names: list[str], n_objectives: int, copies: int, steps: int, repeats: int,
          prompt: int) -> dict[str, Any]:
    coef = row_coefs(len(names), n_objectives, copies)
    n = coef.shape[0]
    decoder = model.base_model.model.get_decoder()
    g = torch.Generator().manual_seed(copies)
    ids = torch.randint(0, 1000, (n, prompt), generator=g)
    mask = torch.ones(n, prompt, dtype=torch.long)
    mask[::3, : prompt // 4] = 0  # some rows left-padded, as in a running batch
    from transformers.cache_utils import DynamicCache

    from emorl.serve.batch import RunningCache

    # path -> (per-row delta, KV cache): the previous step, its LoRA change alone, now, and no delta at all
    paths = {"old": (old_delta_into, DynamicCache), "lora": (None, DynamicCache), "new": (None, RunningCache),
             "base": (no_delta, DynamicCache)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    equal = True
    with lora_bank(model, names) as bank, torch.inference_mode():
        bank.set_row_weights(coef)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = output_cache(decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True))
        for rep in range(repeats):
            hs: dict[str, list[torch.Tensor]] = {}
            for path in (list(paths) if rep % 2 == 0 else list(paths)[::-1]):
                delta, kind = paths[path]
                if delta is not None:
                    bank.delta_into = types.MethodType(delta, bank)
                try:
                    secs, hs[path] = time_steps(decoder, bank, coef, cache, mask, steps,
                                                torch.Generator().manual_seed(rep), kind)
                finally:
                    bank.__dict__.pop("delta_into", None)
                times[path] += secs[1:] if steps > 1 else secs  # the first step of a run warms the plan caches
            equal = equal and all(torch.equal(a, b) and torch.equal(a, c)
                                  for a, b, c in zip(hs["old"], hs["lora"], hs["new"], strict=True))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"{n} rows ({copies} x 8 requests, {len(names)} adapters), KV {prompt}+, medians of {len(times['new'])} "
          f"steps: old {ms['old']:.1f} ms/step, new {ms['new']:.1f} ms/step: new/old {ms['new'] / ms['old']:.3f}. "
          f"The LoRA change alone {ms['lora']:.1f} ms/step ({ms['lora'] / ms['old']:.3f}); without LoRA deltas "
          f"{ms['base']:.1f} ms/step, so the deltas' share: old {1 - ms['base'] / ms['old']:.0%}, now "
          f"{1 - ms['base'] / ms['lora']:.0%}; the growing KV cache saves {1 - ms['new'] / ms['lora']:.0%} of the "
          f"step. Hidden states bit-equal: {equal}")
    return {"rows": n, "copies": copies, **{f"{k}_ms": v for k, v in ms.items()}, "ratio": ms["new"] / ms["old"],
            "equal": equal, **{f"{k}_steps_ms": [1000 * s for s in v] for k, v in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run folder (its adapters and baselines on its base, in float32)")
    ap.add_argument("--copies", default="1", help="comma-separated: copies of the 8-request set (1 = 16 rows)")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=6, help="timed runs per path (alternating)")
    ap.add_argument("--prompt", type=int, default=64, help="KV length before the first step")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="the tiny random model, 16 rows, 3 steps, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.run, args.copies, args.steps, args.repeats, args.prompt = None, "1", 3, 2, 16
    elif not args.run:
        ap.error("give --run DIR (or --quick)")
    model, names, n_objectives = load(args.run)
    res = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "load": os.getloadavg(), "run": args.run, "steps": args.steps, "repeats": args.repeats,
           "results": [bench(model, names, n_objectives, int(c), args.steps, args.repeats, args.prompt)
                       for c in args.copies.split(",")]}
    res["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if all(r["equal"] for r in res["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

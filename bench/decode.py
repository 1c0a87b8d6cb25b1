"""Ensemble decoding benchmark (issue 3), measured side by side in one process.

Setup of anchor-measurements.md: SmolLM2-135M-Instruct (fp32), K=3 LoRA adapters (r=8, alpha=32 on
q,k,v,o,gate,up,down; A as peft initialises it, B ~ N(0, 0.01), seeds 1000+i), B=16 chat-templated prompts
(SmolLM's default system message, ~42 tokens, left-padded), 64 new tokens, greedy, weights (0.78, 0.5, 0.06);
EOS is suppressed in every method so all do exactly 64 steps (generate's min_new_tokens; the same -inf on EOS
in the hand-written loops).

  (a) reference-style EMORL: K merged model copies, no cache, every step recomputes the whole prefix
  (p) peft batching: one cached forward of B*K rows per step with peft's adapter_names (anchor 4a)
  (b) ours: EnsembleModel.generate(mode="hidden", anchor="none")  (convex mix; LoRA bank, shared prefill, KV cache)
  (b+) ours, base-anchored: anchor="base", h0 + sum w_k (h_k - h0): the base stream is one more row group (K+1)
  (c) one adapter alone: PeftModel.generate with the KV cache (anchor 1)
  G=27 weight points ({0.1, 0.5, 0.9}^3) in one generate call vs 27 calls.

    python bench/decode.py                    # everything ((a) once in full: ~12 min on a 2-core CPU)
    python bench/decode.py --quick            # B=4, 8 tokens, G=4 on the tiny random model: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "I lost my job today and I don't know how to tell my family.",
    "My best friend stopped talking to me and I have no idea why.",
    "I feel so alone since I moved to this new city.",
    "My dog died last week and the house feels empty.",
    "I failed my driving test for the third time.",
    "I can't sleep because I keep worrying about money.",
    "My parents are getting divorced and I feel stuck in the middle.",
    "I got rejected from every university I applied to.",
    "My boss criticised me in front of the whole team.",
    "I've been feeling tired and sad for weeks now.",
    "My partner and I keep fighting about small things.",
    "I'm scared about my surgery next month.",
    "Nobody remembered my birthday this year.",
    "I feel like I'm not good enough at anything.",
    "My grandmother is very sick and I can't visit her.",
    "I'm overwhelmed with exams and I can't focus.",
]
WEIGHTS = [0.78, 0.5, 0.06]


def build(n_adapters: int = 3, model: str | None = None) -> tuple[Any, Any, list[str]]:
    from emorl.config import LoraConfig, ModelConfig
    from emorl.ensemble import EnsembleModel
    from emorl.models import add_adapters, load_base

    # system_prompt None: the template's default system message (anchors)
    base = load_base(ModelConfig(system_prompt=None, **({"name": model} if model else {})))
    names = [f"a{i}" for i in range(n_adapters)]
    for i, n in enumerate(names):
        torch.manual_seed(1000 + i)
        add_adapters(base, [n], LoraConfig(r=8, alpha=32, dropout=0.0, target_modules=TARGETS))
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for pname, p in base.model.named_parameters():
                if f"lora_B.{n}." in pname:
                    p.normal_(0.0, 0.01, generator=g)
    return base, EnsembleModel(base), names


def encode(base: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    from emorl.data import encode_prompts, format_prompts

    texts = format_prompts(base.tokenizer, prompts, False, None)
    return encode_prompts(base.tokenizer, texts, 128, False)


def reference_style(base: Any, names: list[str], enc: dict[str, torch.Tensor], w: list[float], steps: int,
                    eos: list[int]) -> torch.Tensor:
    """(a): K full copies with merged LoRA; no KV cache, the whole sequence every step (the reference's loop)."""
    copies = []
    for n in names:
        c = copy.deepcopy(base.model)
        c.set_adapter(n)
        copies.append(c.merge_and_unload(adapter_names=[n]).eval())
    head = copies[0].lm_head
    seq, msk = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        for _ in range(steps):
            pos = msk.cumsum(-1) - 1
            pos.masked_fill_(msk == 0, 1)
            hs = [m(input_ids=seq, attention_mask=msk, position_ids=pos, output_hidden_states=True,
                    use_cache=False).hidden_states[-1][:, -1] for m in copies]
            logits = head(sum(wk * h for wk, h in zip(w, hs, strict=True)))
            logits[:, eos] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            seq, msk = torch.cat([seq, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    del copies
    return seq[:, enc["input_ids"].shape[1]:]


def peft_batched(base: Any, names: list[str], enc: dict[str, torch.Tensor], w: list[float], steps: int,
                 eos: list[int]) -> torch.Tensor:
    """(p): B*K rows adapter-major, one cached forward per step with peft's adapter_names (anchor 4a)."""
    n_adapters, b = len(names), enc["input_ids"].shape[0]
    ids, msk = enc["input_ids"].repeat(n_adapters, 1), enc["attention_mask"].repeat(n_adapters, 1)
    an = [n for n in names for _ in range(b)]
    wt = torch.tensor(w)[:, None, None]
    m = base.model
    head = m.get_output_embeddings()
    out_toks = []
    with torch.inference_mode():
        pos = msk.cumsum(-1) - 1
        pos.masked_fill_(msk == 0, 1)
        out = m(input_ids=ids, attention_mask=msk, position_ids=pos, adapter_names=an, use_cache=True,
                output_hidden_states=True, logits_to_keep=1)
        for _ in range(steps):
            h = out.hidden_states[-1][:, -1].view(n_adapters, b, -1)
            logits = head((h * wt).sum(0))
            logits[:, eos] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            out_toks.append(nxt)
            msk = torch.cat([msk, torch.ones(n_adapters * b, 1, dtype=msk.dtype)], 1)
            pos = pos[:, -1:] + 1
            out = m(input_ids=nxt.repeat(n_adapters, 1), attention_mask=msk, position_ids=pos, cache=out.cache,
                    adapter_names=an, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    return torch.cat(out_toks, 1)


def single_adapter(base: Any, name: str, enc: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """(c): one adapter, peft's generate with the KV cache."""
    base.model.set_adapter(name)
    with torch.inference_mode():
        out = base.model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  pad_token_id=base.tokenizer.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


def timed(fn: Any, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def agree(a: torch.Tensor, b: torch.Tensor) -> str:
    same = (a == b).float()
    return f"{100 * same.mean():.2f} % tokens, {int(same.all(1).sum())}/{a.shape[0]} rows"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of (p), (b), (c)")
    ap.add_argument("--reference-repeats", type=int, default=1, help="timed repeats of (a); 0 skips it")
    ap.add_argument("--points", type=int, default=27, help="weight points for the one-call vs G-calls test; 0 skips")
    ap.add_argument("--max-rows", type=int, default=None, help="EnsembleModel max_rows for the G-point call")
    ap.add_argument("--quick", action="store_true", help="B=4, 8 tokens, G=4, 1 repeat, tiny model (smoke test)")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.tokens, args.repeats, args.points = 4, 8, 1, 4
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base, ens, names = build(model="tiny-llama" if args.quick else None)
    prompts = PROMPTS[: args.prompts]
    enc = encode(base, prompts)
    lens = enc["attention_mask"].sum(1)
    steps, eos = args.tokens, ens.eos
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; load average at start {os.getloadavg()}")
    mean = float(lens.float().mean())
    print(f"B={len(prompts)} prompts of {int(lens.min())}-{int(lens.max())} tokens (mean {mean:.1f}),"
          f" {steps} new tokens, K={len(names)}, weights {WEIGHTS}")
    res: dict[str, Any] = {"load_start": os.getloadavg()}
    kw = {"max_new_tokens": steps, "min_new_tokens": steps}

    def ours() -> torch.Tensor:  # convex: greedy tokens equal the reference's sum_k w_k h_k (scale invariant)
        return ens.generate(prompts, WEIGHTS, mode="hidden", anchor="none", **kw).token_ids

    def anchored() -> torch.Tensor:
        return ens.generate(prompts, WEIGHTS, mode="hidden", anchor="base", **kw).token_ids

    # warm-ups (untimed, short)
    ens.generate(prompts, WEIGHTS, max_new_tokens=4, min_new_tokens=4, anchor="none")
    single_adapter(base, names[0], enc, 4)
    peft_batched(base, names, enc, WEIGHTS, 4, eos)
    tb, tc, tp, tn = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting load on a shared machine hits all alike
        t, tok_b = timed(ours, 1)
        tb += t
        tn += timed(anchored, 1)[0]
        tc += timed(lambda: single_adapter(base, names[0], enc, steps), 1)[0]
        t, tok_p = timed(lambda: peft_batched(base, names, enc, WEIGHTS, steps, eos), 1)
        tp += t
    res.update(b=tb, c=tc, p=tp, anchored=tn)
    med = {k: statistics.median(v) for k, v in (("b", tb), ("c", tc), ("p", tp), ("n", tn))}
    print(f"(b) ours       median {med['b']:.2f} s  {[round(x, 2) for x in tb]}")
    print(f"(b+) anchored  median {med['n']:.2f} s  {[round(x, 2) for x in tn]}   (b+)/(c) = "
          f"{med['n'] / med['c']:.2f}   (b+)/(b) = {med['n'] / med['b']:.2f}")
    print(f"(c) one adapter median {med['c']:.2f} s  {[round(x, 2) for x in tc]}")
    print(f"(p) peft batch  median {med['p']:.2f} s  {[round(x, 2) for x in tp]}")
    print(f"(b)/(c) = {med['b'] / med['c']:.2f}   (p)/(c) = {med['p'] / med['c']:.2f}   "
          f"(p)/(b) = {med['p'] / med['b']:.2f}")
    print(f"tokens (b) vs (p): {agree(tok_b, tok_p)}")
    if args.reference_repeats > 0:
        ta, tok_a = timed(lambda: reference_style(base, names, enc, WEIGHTS, steps, eos), args.reference_repeats)
        res["a"] = ta
        med["a"] = statistics.median(ta)
        print(f"(a) reference  median {med['a']:.2f} s  {[round(x, 2) for x in ta]}")
        print(f"(a)/(b) = {med['a'] / med['b']:.1f}   (a)/(c) = {med['a'] / med['c']:.1f}")
        print(f"tokens (b) vs (a): {agree(tok_b, tok_a)}")
    if args.points > 0:
        grid = [list(p) for p in itertools.product([0.1, 0.5, 0.9], repeat=3)][: args.points]
        t0 = time.perf_counter()
        one = ens.generate(prompts, grid, mode="hidden", anchor="none", max_rows=args.max_rows, **kw)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        sep = [ens.generate(prompts, w, mode="hidden", anchor="none", **kw).token_ids for w in grid]
        t_sep = time.perf_counter() - t0
        res.update(g_one=t_one, g_sep=t_sep, g_chunks=one.stats["chunks"], g_rows=one.stats["rows_per_chunk"])
        print(f"G={len(grid)} points: one call {t_one:.1f} s ({one.stats['chunks']} chunks of <= "
              f"{one.stats['rows_per_chunk']} rows), {len(grid)} calls {t_sep:.1f} s, ratio {t_sep / t_one:.2f}; "
              f"tokens: {agree(one.token_ids.reshape(-1, steps), torch.stack(sep).reshape(-1, steps))}")
    res["load_end"] = os.getloadavg()
    print(f"# load average at end {res['load_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

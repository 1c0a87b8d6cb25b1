"""Reward throughput on CPU, each emorl reward timed side by side with a plainly written reference.

* fluency (SmolLM2-135M, adapters disabled): emorl's length-sorted, left-padded micro-batches with logits only
  for reply positions and the shared system-prompt prefix run once, against the reference's way (one sample
  at a time, full forward, full logits).
* reflection / empathy (all-MiniLM-L6-v2): emorl's encoder against sentence-transformers' ``encode``.
* nontoxic, length: throughput only.

Replies are real: SmolLM2 greedy replies (up to 48 new tokens) to the first N built-in prompts.

    python bench/bench_rewards.py [--n 64] [--repeats 3]
    python bench/bench_rewards.py --quick        # smoke run: 4 replies, 1 repeat, fluency on the tiny random model
"""

from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin-wait for a busy core make every op tens of times slower;
# passive waiting keeps timings meaningful. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out, ts = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def import_time(stmt: str) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 replies, 1 repeat, tiny random model")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 4, 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from emorl.config import ModelConfig
    from emorl.data import default_records, encode_prompts, format_prompts
    from emorl.models import load_base
    from emorl.rewards import build_reward, build_rewards, score

    print(f"load average before: {os.getloadavg()[0]:.2f}")
    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None) if args.quick else None)
    tok = base.tokenizer
    prompts = [r.prompt for r in default_records()[: args.n]]
    t = time.perf_counter()
    enc = encode_prompts(tok, format_prompts(tok, prompts, False, base.config.system_prompt),
                         base.config.max_prompt_tokens, False)
    with torch.inference_mode():
        out = base.model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    n_tok = [len(tok(r, add_special_tokens=False).input_ids) for r in replies]
    print(f"{args.n} replies generated in {time.perf_counter() - t:.1f} s; reply tokens median {np.median(n_tok):.0f}, "
          f"max {max(n_tok)}")

    rows: list[tuple[str, float, float | None, str]] = []

    # ---- fluency
    flu = build_reward("fluency", {"type": "fluency"}, base=base)
    texts = format_prompts(tok, prompts, False, base.config.system_prompt)

    def ref_fluency() -> np.ndarray:
        nll = []
        with torch.inference_mode():
            for c, r in zip(texts, replies, strict=True):
                ci = tok(c, add_special_tokens=False).input_ids
                ri = tok(r, add_special_tokens=False).input_ids
                ids = torch.tensor([ci + ri])
                labels = ids.clone()
                labels[0, : len(ci)] = -100
                nll.append(float(base.model(input_ids=ids, labels=labels).loss))
        return np.array(nll)

    score(flu, prompts[:4], replies[:4])  # warm-up
    t_ours, s_ours = median_time(lambda: score(flu, prompts, replies), args.repeats)
    t_ref, nll_ref = median_time(ref_fluency, args.repeats)
    nll_ours = np.log(flu.ppl0) + np.log((1 - s_ours) / s_ours)  # invert ppl0 / (ppl0 + ppl)
    diff = float(np.max(np.abs(nll_ours - nll_ref)))
    rows.append(("fluency (SmolLM2-135M)", t_ours, t_ref, f"max |NLL diff| {diff:.1e}"))
    for label, opts in [("fluency, share_prefix false", {"share_prefix": False}),
                        ("fluency, micro_batch 32", {"micro_batch": 32})]:
        f2 = build_reward("fluency", {"type": "fluency", **opts}, base=base)
        tm, _ = median_time(lambda f2=f2: score(f2, prompts, replies), args.repeats)
        rows.append((label, tm, t_ref, ""))

    # ---- MiniLM rewards vs sentence-transformers
    rw = build_rewards({"reflection": {"type": "reflection"}, "empathy": {"type": "empathy"}})
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(rw["reflection"].encoder.path, device="cpu")

    def ref_similarity() -> np.ndarray:
        a = st.encode(prompts, normalize_embeddings=True, batch_size=64)
        b = st.encode(replies, normalize_embeddings=True, batch_size=64)
        return (a * b).sum(-1)

    refl = rw["reflection"]
    score(refl, prompts[:4], replies[:4])
    t_ours, _ = median_time(lambda: score(refl, prompts, replies), args.repeats)
    t_sim, sim_ref = median_time(ref_similarity, args.repeats)
    diff = float(np.max(np.abs(refl.similarity(prompts, replies) - sim_ref)))
    rows.append(("reflection (MiniLM)", t_ours, t_sim, f"max |cos diff| {diff:.1e}"))
    emp = rw["empathy"]
    t_ours, _ = median_time(lambda: score(emp, prompts, replies), args.repeats)
    t_enc, _ = median_time(lambda: st.encode(replies, normalize_embeddings=True, batch_size=64), args.repeats)
    rows.append(("empathy (MiniLM)", t_ours, t_enc, "ref: ST encode of the replies only"))

    # ---- cheap rewards
    for name, spec in [("nontoxic", {"type": "nontoxic"}), ("length", {"type": "length"})]:
        r = build_reward(name, spec)
        score(r, prompts[:4], replies[:4])
        tm, _ = median_time(lambda r=r: score(r, prompts, replies), args.repeats)
        rows.append((name, tm, None, ""))

    print(f"\n{args.n} (prompt, reply) pairs, median of {args.repeats}; speed-up = reference time / emorl time\n")
    print("| reward | emorl | reference | speed-up | emorl pairs/s | note |")
    print("|---|---|---|---|---|---|")
    for name, tm, tr, note in rows:
        ref = f"{tr * 1e3:.0f} ms" if tr is not None else "–"
        ratio = f"{tr / tm:.2f}x" if tr is not None else "–"
        print(f"| {name} | {tm * 1e3:.0f} ms | {ref} | {ratio} | {args.n / tm:.0f} | {note} |")

    if args.quick:
        return
    t_tr = import_time("from transformers import AutoModel")
    t_st = import_time("import sentence_transformers")
    print(f"\nfresh-process import: transformers AutoModel {t_tr:.2f} s, sentence_transformers {t_st:.2f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

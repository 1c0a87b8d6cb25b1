"""Does a reply depend on the batch it is decoded in? The base model's sampled replies to the first prompts of the
test split, decoded as a batch of their own and inside a batch of all the prompts, compared per dtype.

    python bench/batch_invariance.py                                  # float32 and bfloat16, 16 of 100 prompts
    python bench/batch_invariance.py --dtypes bfloat16 --isa AVX512_CORE_BF16   # bf16 with AMX switched off
    python bench/batch_invariance.py --quick --out DIR/b.json     # smoke run: float32, tiny random model, 4 prompts

Why: ``model.dtype: auto`` picks bfloat16 on CPU only where its kernels keep replies batch-invariant (emorl serve's
promise: a seed's reply is the same whatever shares its batch). On an AMX CPU, oneDNN's bf16 matmuls round
differently with the number of rows. Each configuration runs in a fresh process, because oneDNN reads
``ONEDNN_MAX_CPU_ISA`` (``--isa``) once, at its first bf16 matmul (the record's ``bf16_kernels`` names what the CPU
has, not the cap). The default preset's model settings and test split, on CPU; no network. Writes
bench/results/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def one(dtype: str, prompts: int, first: int, tokens: int, model: str | None = None) -> dict:
    """Decode in this process: the first ``first`` prompts alone, then all ``prompts``; count replies that differ."""
    import dataclasses

    from emorl.config import GenerationConfig, load_config
    from emorl.data import load_splits
    from emorl.decoding import Decoder
    from emorl.models import environment, load_base

    cfg = load_config("default")  # the study's model settings (prompt length, system prompt) and data split
    base = load_base(dataclasses.replace(cfg.model, dtype=dtype, device="cpu", **({"name": model} if model else {})))
    texts = [r.prompt for r in load_splits(cfg.data).test[:prompts]]
    if len(texts) < first:
        raise SystemExit(f"--first {first} is more than the {len(texts)} prompts decoded")
    dec = Decoder(base, GenerationConfig(max_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=50))

    def decode(batch: list[str]) -> tuple[list[list[int]], float, int]:
        t0 = time.perf_counter()
        res = dec.generate({}, batch, [], "hidden", "base", seed=0, progress=False)
        ids = [row[:n].tolist() for row, n in zip(res.token_ids, res.lengths.tolist(), strict=True)]
        return ids, time.perf_counter() - t0, int(res.stats.get("chunks", 0))

    alone, t_alone, chunks_alone = decode(texts[:first])
    together, t_all, chunks_all = decode(texts)
    differ = [i for i in range(first) if alone[i] != together[i]]  # token ids, not text: no difference hides
    return {"chunks": [chunks_alone, chunks_all], "dtype": dtype, "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "environment": environment(base),
            "prompts": len(texts), "first": first, "max_new_tokens": tokens, "differ": len(differ),
            "differ_at": differ, "seconds_first": round(t_alone, 2), "seconds_all": round(t_all, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--isa", default=None, help="ONEDNN_MAX_CPU_ISA for every configuration, e.g. AVX512_CORE_BF16")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--first", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default=str(OUT / "batch_invariance.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: float32 on the tiny random model, 2 of 4 prompts")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: decode one dtype, print its JSON
    args = ap.parse_args()
    if args.quick:
        args.dtypes, args.prompts, args.first, args.tokens = "float32", 4, 2, 4
    if args.one:
        print(json.dumps(one(args.one, args.prompts, args.first, args.tokens, "tiny-llama" if args.quick else None)))
        return
    env = os.environ | ({"ONEDNN_MAX_CPU_ISA": args.isa} if args.isa else {})
    rows = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--one", dtype, "--prompts", str(args.prompts), "--first", str(args.first),
               "--tokens", str(args.tokens), *(["--quick"] if args.quick else [])]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # the child's errors reach stderr
        if proc.returncode:
            raise SystemExit(f"{dtype}: the decoding process failed (exit {proc.returncode}); see above")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{dtype} (CPU's bf16 kernels {row['environment']['bf16_kernels']}, ISA cap {row['isa_cap']}): "
              f"{row['differ']} of {row['first']} replies differ between a batch of {row['first']} and of "
              f"{row['prompts']} (decoded in {row['chunks'][1]} chunk(s)); {row['seconds_all']:.1f} s for "
              f"{row['prompts']} prompts", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + [{"date": time.strftime("%Y-%m-%d %H:%M"), "runs": rows}], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

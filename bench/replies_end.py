"""Replies that end (issue 26 §7): the share of a run's replies that end with EOS before the token limit, and their
mean length, for each system prompt and ``max_new_tokens`` option, and what each option costs the study.

    python bench/replies_end.py --run runs/default --prompts 32 --lengths 24,48,64,96 --output out.json
    python bench/replies_end.py --quick          # a tiny random run made in a temp folder (the plumbing only)

Each (system prompt, method) is decoded ONCE at the largest limit through emorl's own decoder
(:class:`emorl.decoding.Decoder`, the evaluation's ``eval.generation`` sampling and its first seed, on the first
``--prompts`` statements of the VALIDATION split). A reply's first L tokens do not depend on the limit (no
``min_new_tokens``), so "ended within L" and "length at limit L" (min(length, L)) for every L come from that one
decode. The decoder drops a row once it ends, so a decode's cost follows the tokens decoded, not the limit: each
(prompt, method) is also decoded at the smallest limit, side by side in this process, and the time at a limit L is
interpolated linearly in tokens decoded between the two measured decodes. The projected study scales the
decode-bound stages (search: EMORL's mix; evaluate: all measured methods together) by that time ratio against
(today's prompt, smallest limit) and keeps training and the baselines as they are (their rollouts keep
``train.generation``).

The run's adapters were trained under the run's own system prompt; another prompt decodes them off their training
prompt (a warning says so), which is what this measures: a changed default prompt means retraining in the study.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import tiny_run  # noqa: E402

PROMPTS = {
    "two-sentences": None,  # the run's own system prompt (today's default: "... in one or two sentences.")
    "one-sentence": "You are a warm, supportive listener. Reply to the person in one short sentence.",
    "one-sentence-15w": "You are a warm, supportive listener. Reply to the person in one short sentence of at most "
                        "15 words.",
    "one-sentence-stop": "You are a warm, supportive listener. Reply to the person in one short sentence, then stop.",
}
# "NAME+stop": that prompt, and each reply also stops at its first sentence end (EnsembleModel.generate's ``stop``
# strings): "ended" then means EOS or a sentence end before the limit, not EOS alone
STOP = [".", "!", "?"]
# run 9 (bench/RESULTS.md): the default study's measured stage minutes on a fresh 2-core machine
STAGES = {"train": 3.7, "baselines": 4.1, "search": 6.1, "evaluate": 6.0}


def ended_flags(token_ids: np.ndarray, lengths: np.ndarray, eos: set[int], limit: int | None = None) -> np.ndarray:
    """True where a row ended on its own, per row: its last generated token is EOS, or (``limit``: a decode with
    stop strings) it stopped before the limit."""
    return np.array([n > 0 and (int(token_ids[i, n - 1]) in eos or (limit is not None and n < limit))
                     for i, n in enumerate(lengths.tolist())])


def at_limit(lengths: np.ndarray, ended: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(ended within ``limit``, reply length under ``limit``) per row, from a decode at a larger limit."""
    return ended & (lengths <= limit), np.minimum(lengths, limit)


def interpolate_seconds(tokens: float, lo: tuple[float, float], hi: tuple[float, float]) -> float:
    """Decode seconds at ``tokens`` decoded, linear between two measured (tokens, seconds) decodes."""
    (t0, s0), (t1, s1) = lo, hi
    if t1 <= t0:
        return s1
    return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)


def measure(run: Path, prompts_n: int, lengths: list[int], methods: list[str], variants: list[str],
            split: str, partial: Path | None = None) -> dict:
    """Decode every (variant, method) at max(lengths) and at min(lengths); ended share, length and time per L."""
    from emorl.config import load_config
    from emorl.data import load_splits
    from emorl.decoding import Decoder
    from emorl.methods import any_adapter, resolve_methods
    from emorl.models import load_base
    from emorl.stats import bootstrap_ci

    cfg = load_config(run / "config.yaml")
    specs = resolve_methods(run, cfg, methods)
    base = load_base(cfg.model)
    prompts = [r.prompt for r in load_splits(cfg.data)[split][:prompts_n] if r.prompt.strip()]
    seed = cfg.eval.seeds[0]
    lo, hi = min(lengths), max(lengths)
    decoder = Decoder(base, replace(cfg.eval.generation, max_new_tokens=hi), any_adapter(run, specs))
    run_prompt = cfg.model.system_prompt
    out: dict = {"run": str(run), "split": split, "prompts": len(prompts), "seed": seed, "lengths": lengths,
                 "generation": {**vars(cfg.eval.generation), "max_new_tokens": hi}, "system_prompts": {},
                 "results": {}}
    for v in variants:
        name, stop = v.removesuffix("+stop"), v.endswith("+stop")
        sp = PROMPTS[name] if PROMPTS[name] is not None else run_prompt
        out["system_prompts"][v] = sp
        base.config.system_prompt = sp
        kw = {"stop": STOP} if stop else {}
        for s in specs:
            res = decoder.result(s, prompts, seed, **kw)
            eos = set(decoder.ensemble(s.adapters if s.kind != "base" else decoder.base_adapter).eos)
            n = res.lengths.cpu().numpy().astype(int)
            ended = ended_flags(res.token_ids.cpu().numpy(), n, eos, hi if stop else None)
            short = decoder.result(s, prompts, seed, max_new_tokens=lo, **kw)  # side by side: the low limit's time
            n_lo = short.lengths.cpu().numpy().astype(int)
            meas = ((float(n_lo.sum()), float(short.stats["seconds"])), (float(n.sum()), float(res.stats["seconds"])))
            per_l = {}
            for L in lengths:
                e, ln = at_limit(n, ended, L)
                per_l[str(L)] = {"ended": float(e.mean()), "ended_ci95": bootstrap_ci(e.astype(float)),
                                 "mean_length": float(ln.mean()), "tokens": int(ln.sum()),
                                 "seconds": round(interpolate_seconds(float(ln.sum()), *meas), 2)}
            out["results"].setdefault(v, {})[s.name] = {
                "per_limit": per_l, "lengths": n.tolist(), "ended": ended.tolist(),
                "measured": {"low": {"limit": lo, "tokens": int(n_lo.sum()), "seconds": meas[0][1]},
                             "high": {"limit": hi, "tokens": int(n.sum()), "seconds": meas[1][1],
                                      "row_steps": int(res.stats.get("row_steps", 0))}},
                "replies": list(res.texts)}
            print(f"{v:18s} {s.name:8s} " + "  ".join(
                f"L{L}: {per_l[str(L)]['ended']:.0%} len {per_l[str(L)]['mean_length']:.1f} "
                f"{per_l[str(L)]['seconds']:.1f}s" for L in lengths), flush=True)
            if partial is not None:  # a long measurement keeps what it has
                partial.write_text(json.dumps(out, indent=1))
    base.config.system_prompt = run_prompt
    return out


def project(out: dict, stages: dict[str, float], search_method: str = "emorl") -> dict:
    """Projected study minutes per (variant, L): the search scales with ``search_method``'s decode, the evaluation
    with all measured methods' together, both against (the run's prompt, the smallest limit); training and the
    baselines stay. Two ways: ``minutes`` by tokens decoded (each method weighted by its measured seconds at the
    reference, so a 4-stream mix weighs 4x; steady under load, but blind to the longer attention context), and
    ``minutes_timed`` by the interpolated seconds (noisy on a loaded machine)."""
    ref_v = "two-sentences" if "two-sentences" in out["results"] else next(iter(out["results"]))
    lo = str(min(out["lengths"]))
    ref = out["results"][ref_v]
    proj: dict = {}
    for v, per_method in out["results"].items():
        for L in [x for x in map(str, out["lengths"]) if x in next(iter(per_method.values()))["per_limit"]]:
            def get(m: str, key: str, table: dict = per_method, lim: str = L) -> float:
                return float(table[m]["per_limit"][lim][key])

            def ratio(ms: list[str], key: str) -> float:
                if key == "seconds":
                    return sum(get(m, key) for m in ms) / max(sum(get(m, key, ref, lo) for m in ms), 1e-9)
                w = {m: get(m, "seconds", ref, lo) for m in ms}
                return sum(w[m] * get(m, key) / max(get(m, key, ref, lo), 1e-9) for m in ms) / max(sum(w.values()),
                                                                                                   1e-9)

            sm = [search_method if search_method in per_method else next(iter(per_method))]
            every = [m for m in per_method if m in ref]
            row = {}
            for key, label in (("tokens", "minutes"), ("seconds", "minutes_timed")):
                r_s, r_e = ratio(sm, key), ratio(every, key)
                row[label] = round(stages["train"] + stages["baselines"] + stages["search"] * r_s
                                   + stages["evaluate"] * r_e, 1)
                row[f"{label}_ratios"] = {"search": round(r_s, 3), "evaluate": round(r_e, 3)}
            proj.setdefault(v, {})[L] = row
    return proj


def table(out: dict) -> str:
    """The markdown table for bench/RESULTS.md."""
    methods = list(next(iter(out["results"].values())))
    head = "| system prompt | max_new_tokens | " + " | ".join(f"{m} ended % [95% CI]" for m in methods) + \
        " | " + " | ".join(f"{m} mean length" for m in methods) + " | projected study, min (by tokens; timed) |"
    lines = [head, "|" + "---|" * (3 + 2 * len(methods))]
    for v, per_method in out["results"].items():
        for L in [x for x in map(str, out["lengths"]) if x in out["projection"][v]]:
            got = {m: per_method[m]["per_limit"][L] for m in methods if m in per_method}
            cells = [f"{100 * got[m]['ended']:.0f} [{100 * got[m]['ended_ci95'][0]:.0f}, "
                     f"{100 * got[m]['ended_ci95'][1]:.0f}]" if m in got else "–" for m in methods]
            cells += [f"{got[m]['mean_length']:.1f}" if m in got else "–" for m in methods]
            proj = out["projection"][v][L]
            lines.append(f"| {v} | {L} | " + " | ".join(cells) + f" | {proj['minutes']:.1f}; "
                         f"{proj['minutes_timed']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished study (adapters, baselines/uniform, search/hidden/best.json)")
    ap.add_argument("--quick", action="store_true",
                    help="4 prompts, L 4/8; on --run, or a tiny random run in a temp folder")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--lengths", default="24,48,64,96")
    ap.add_argument("--methods", default="base,emorl,uniform")
    ap.add_argument("--variants", default=",".join(PROMPTS),
                    help=f"system prompts, of {', '.join(PROMPTS)}; NAME+stop also stops at a sentence end")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--output", help="write the results as JSON here")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no decoding: merge measured JSON files (their variants) and print the table again")
    args = ap.parse_args()
    variants = args.variants.split(",")
    bad = [v for v in variants if v.removesuffix("+stop") not in PROMPTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {', '.join(PROMPTS)}")
    lengths = sorted({int(x) for x in args.lengths.split(",")})
    if args.merge:
        out = json.loads(Path(args.merge[0]).read_text())
        for extra in args.merge[1:]:
            more = json.loads(Path(extra).read_text())
            keep = [str(x) for x in out["lengths"] if x in more["lengths"]]
            for v, ms in more["results"].items():  # a variant measured again keeps both, the later one as "v#2"
                key = v if v not in out["results"] else f"{v}#2"
                out["results"][key] = {m: {**r, "per_limit": {L: r["per_limit"][L] for L in keep
                                                              if L in r["per_limit"]}} for m, r in ms.items()}
                out["system_prompts"][key] = more["system_prompts"][v]
        out["projection"] = project(out, STAGES)
        print(table(out))
        if args.output:
            Path(args.output).write_text(json.dumps(out, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="replies-end-") as tmp:
        if args.quick:  # the given run, or a tiny random study of its own
            run, n, lengths = Path(args.run) if args.run else tiny_run(Path(tmp)), 4, [4, 8]
        elif args.run:
            run, n = Path(args.run), args.prompts
        else:
            ap.error("give --run RUN or --quick")
        t0 = time.perf_counter()
        partial = Path(args.output + ".partial") if args.output else None
        out = measure(run, n, lengths, args.methods.split(","), variants, args.split, partial)
    out["projection"] = project(out, STAGES)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(out))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

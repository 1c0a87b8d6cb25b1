"""The up-front time estimate of ``emorl run``: decoding speed probed on the loaded base, applied to every unit's
budget (training steps, search points, evaluation decodes) in full. An estimate, not a bound: on another CPU
the stages' shares move (bench/RESULTS.md, run 8)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from emorl.methods import method_kind
from emorl.pipeline.plan import Plan


@dataclass
class Speed:
    """Decoding cost on this machine, from a short probe of emorl's own decoder: a forward pass costs
    ``prefill_token`` seconds per row-token (compute-bound: prefill, the k-SCST update), a decode step
    ``a + b * rows`` seconds (mostly per-step overhead)."""

    a: float
    b: float
    reward_s: float = 0.02  # scoring one reply with one reward (probed with the run's rewards where given)
    prefill_token: float = 0.0
    # training's rollouts (transformers' ``generate`` through the LoRA bank): (a, b) seconds per token, prefill
    # included, probed separately (in bfloat16 it is slower per row than in float32, emorl's decoder faster)
    rollout: tuple[float, float] | None = None

    def gen(self, rows: float, tokens: float, prompt_tokens: float = 0.0, prefill_rows: float | None = None) -> float:
        """Decoding ``tokens`` for ``rows`` rows after prefilling ``prefill_rows`` (default: every row) prompts of
        ``prompt_tokens``."""
        pre = rows if prefill_rows is None else prefill_rows
        return self.prefill_token * pre * prompt_tokens + tokens * (self.a + self.b * rows)


PROBE_STATEMENT = "I have been feeling low since I moved to a new city, and I miss my friends and my family."


def probe_speed(base: Any, tokens: int = 16, rewards: dict[str, Any] | None = None) -> Speed:
    """Time emorl's decoder (the base model as an ensemble of no adapter) on 2 and 48 rows of a chat-formatted
    statement, for 1 and ``tokens`` forced tokens (about 10 s on the default model and a 2-core CPU).

    The decoder is what every stage decodes with, so its speed carries the dtype's real cost (bfloat16 speeds
    emorl's compute-bound prefill several-fold; transformers' ``generate`` got slower with it). The prefill is
    timed on its own: it is compute-bound and scales with the rows, while a decode step is mostly per-step
    overhead. The per-row costs are taken at 48 rows: the pipeline's big decodes are batched."""
    from emorl.data import encode_prompts, format_prompts
    from emorl.ensemble.model import EnsembleModel

    ens = EnsembleModel(base, {}, allow_empty=True, require_metadata=False)
    best: dict[tuple[int, int], float] = {}
    for rows in (2, 2, 48):  # the short calls twice (the faster counts): they catch load spikes the most
        for n in (1, tokens):
            t0 = time.perf_counter()
            ens.generate([PROBE_STATEMENT] * rows, [], max_new_tokens=n, min_new_tokens=n)
            best[rows, n] = min(best.get((rows, n), float("inf")), time.perf_counter() - t0)
    step = {rows: max(0.0, (best[rows, tokens] - best[rows, 1]) / (tokens - 1)) for rows in (2, 48)}
    b = max(0.0, (step[48] - step[2]) / 46)
    width = encode_prompts(ens.tokenizer, format_prompts(ens.tokenizer, [PROBE_STATEMENT], base.is_seq2seq,
                                                         base.config.system_prompt), 10**6, base.is_seq2seq)
    prefill = max(0.0, best[48, 1] - step[48]) / (48 * width["input_ids"].shape[1])  # the 1-token call
    # a row's decode step does at least the arithmetic of one prefill token: the floor of b, whose probe (the
    # difference of two overhead-bound steps) is noisy where steps are cheap
    b = max(b, prefill)
    return Speed(a=max(1e-4, step[2] - 2 * b), b=b, prefill_token=prefill, rollout=probe_generate(base),
                 reward_s=probe_rewards(rewards) if rewards else REWARD_S)


def probe_generate(base: Any, tokens: int = 4) -> tuple[float, float]:
    """(a, b): seconds per token of transformers' ``generate`` for ``rows`` rows is ``a + b * rows`` (prefill of a
    24-token prompt included), from forced-length generations of 2 rows (the faster of two) and 48 rows."""
    import torch

    ids = torch.arange(100, 124, device=base.device).repeat(48, 1)
    times: dict[int, float] = {}
    with torch.inference_mode():
        for rows in (2, 2, 48):
            t0 = time.perf_counter()
            base.model.generate(input_ids=ids[:rows], attention_mask=torch.ones_like(ids[:rows]),
                                do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                pad_token_id=base.tokenizer.pad_token_id)
            times[rows] = min(times.get(rows, float("inf")), (time.perf_counter() - t0) / tokens)
    b = max(0.0, (times[48] - times[2]) / 46)
    return max(1e-4, times[2] - 2 * b), b


def probe_rewards(rewards: dict[str, Any], n: int = 16) -> float:
    """Seconds to score one reply with one reward: the faster of two batches of ``n`` short replies per reward."""
    from emorl.rewards import score

    prompts = ["I have been feeling low since I moved to a new city."] * n
    replies = ["It sounds like the move has been hard, and you miss the people you knew."] * n
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for r in rewards.values():
            score(r, prompts, replies)
        best = min(best, (time.perf_counter() - t0) / (n * len(rewards)))
    return best


# Calibrated on the default preset (SmolLM2-135M, 2-core CPU; float32 and bfloat16 studies, bench/RESULTS.md): a
# k-SCST update (forward and backward over prompt + reply, and the reference model's forward) costs LOSS_FACTOR
# forward passes; the stages' decodes through emorl's decoder take DECODE_FACTOR x the probe's figure (larger
# batches than the probe's 48 rows, longer caches, per-method setup); a search's figures ~2 s. Mixes of the K
# adapters (hidden, logits, probs) prefill each prompt once per stream for all weight points of a call; params
# re-runs the prefill for every point.
LOSS_FACTOR = 4.0
ROLLOUT_FACTOR = 1.0
DECODE_FACTOR = 1.6
CONVEX_DECODED = 0.8  # share of a convex search's points decoded (36 of 46 in the default run)
REWARD_S = 0.02
PLOT_S = 2.0


def stream_width(key: str | None, anchor: str, n_adapters: int) -> tuple[int, bool]:
    """(backbone rows per prompt, whether weight points share the prefill) of a mix: params one merged stream (its
    prefill re-run per point); the other modes K adapter streams, plus the base stream when base-anchored."""
    if key is None:
        return 1, False
    if key.startswith("params"):
        return 1, False
    convex = key.endswith("-convex") or key.startswith("probs") or anchor == "none"
    return n_adapters + (0 if convex else 1), True


def estimate(plan: Plan, speed: Speed) -> None:
    """Fill ``estimate_s`` of every unit that must run, at the probed decoding speed, with budgets in full
    (replies at full length, training to max_steps, every search point decoded)."""
    from emorl.prompts import PAD_MULTIPLE
    from emorl.search.hierarchical import expected_evaluations

    cfg, t = plan.cfg, plan.cfg.train
    prompt_len = 0.6 * cfg.model.max_prompt_tokens + PAD_MULTIPLE  # a typical batch's width, aligned padding included
    n_obj = len(plan.objectives)

    def mix(points: int, prompts: int, width: int, shared: bool, tokens: int) -> float:
        """One ensemble decode of ``points`` weight points x ``prompts`` prompts, ``width`` rows per prompt."""
        rows = points * prompts * width
        return DECODE_FACTOR * speed.gen(rows, tokens, prompt_len, prompts * width if shared else rows)

    from emorl.train.policy import val_every

    def training(policies: int, strategy: str) -> float:
        rows = policies * t.batch_size * t.k
        tok = t.generation.max_new_tokens
        ra, rb = speed.rollout or (speed.a, speed.b + speed.prefill_token * prompt_len / tok)

        def sampled(n: int) -> float:  # n rows sampled and scored as rollouts are (validation too)
            return ROLLOUT_FACTOR * tok * (ra + rb * n) + speed.reward_s * n * n_obj

        step = sampled(rows) + LOSS_FACTOR * speed.prefill_token * rows * (prompt_len + tok)
        val = sampled(policies * t.val_prompts * t.val_samples)
        every = val_every(t, strategy)  # at step 0, every `every` steps, and the last step
        rounds = 1 + t.max_steps // every + (1 if t.max_steps % every else 0)
        return t.max_steps * step + rounds * val

    train_todo = plan.todo("train")
    for s in train_todo:
        s.estimate_s = training(len(train_todo), "single") / len(train_todo)
    base_todo = plan.todo("baselines")  # trained together, like the adapters
    for s in base_todo:
        s.estimate_s = training(len(base_todo), s.name) / len(base_todo)
    sc = cfg.search
    search_todo = plan.todo("search")
    if search_todo:
        from emorl.data import load_splits
        from emorl.search.objective import search_seeds

        n_val = len(load_splits(cfg.data).validation)
        n_p = min(sc.prompts or n_val, n_val)  # search.prompts null: the whole validation split
        n_seeds = len(search_seeds(sc.seeds, sc.generation))
        n_re = min(sc.reeval_prompts or n_val, n_val) * len(search_seeds(sc.reeval_seeds, sc.generation))
    for s in search_todo:
        width, shared = stream_width(s.name, sc.anchor, n_obj)
        n = expected_evaluations(n_obj, sc.iterations)
        if width != 1 and s.name.endswith("-convex"):
            n = round(n * CONVEX_DECODED)  # points on one ray share a decode
        calls = -(-n // sc.batch_points)
        tok = sc.generation.max_new_tokens
        decode = n_seeds * calls * mix(min(n, sc.batch_points), n_p, width, shared, tok)
        reeval = mix(sc.reeval_top, n_re, width, shared, tok) if sc.reeval_top else 0.0
        s.estimate_s = decode + reeval + (n * n_p * n_seeds + sc.reeval_top * n_re) * speed.reward_s * n_obj + PLOT_S
    for s in plan.todo("route"):  # the lattice (plus the search's best) x the router's prompts, per seed
        from math import comb

        rc, g = cfg.route, cfg.eval.generation
        pts = comb(round(1 / rc.step) + n_obj - 1, n_obj - 1) + 1
        n = rc.prompts or 64
        s.estimate_s = len(rc.seeds) * (mix(pts, n, n_obj, True, g.max_new_tokens) + pts * n * speed.reward_s * n_obj)
    for s in plan.todo("evaluate"):
        from emorl.methods import decode_seeds

        seeds = len(decode_seeds(cfg))
        g = cfg.eval.generation
        n = cfg.eval.prompts or 64
        widths = [stream_width(method_kind(m)[1], cfg.search.anchor, n_obj)[0]
                  if method_kind(m)[0] in ("ensemble", "routed") else 1 for m in plan.methods]
        ev = cfg.eval
        scorers = n_obj + len(ev.judges)  # the held-out judges score every reply too (eval.judges)
        # the test split, then each of eval.extra_sets that decodes the method (a set's `methods`, or all)
        sets = {m: [n] + [int(x.get("prompts") or n) for x in ev.extra_sets.values()
                          if not x.get("methods") or m in x["methods"]] for m in plan.methods}
        kl_n = min(ev.kl_prompts or n, n) if ev.kl else 0  # eval.kl: the base's forward over kl_n replies per method
        s.estimate_s = seeds * sum(sum(mix(1, k, w, True, g.max_new_tokens) + k * speed.reward_s * scorers
                                       for k in sets[m]) + kl_n * speed.reward_s
                                   for m, w in zip(plan.methods, widths, strict=True))
    for s in plan.todo("front"):
        from emorl.methods import decode_seeds

        fc, g = cfg.front, cfg.eval.generation
        lattice = (int(round(fc.w_max / fc.step)) + 1) ** n_obj
        n = min(fc.prompts or 10**9, cfg.eval.prompts or 64)
        seeds = len(fc.seeds or decode_seeds(cfg))
        jobs = [(m, lattice, cfg.search.anchor) for m in fc.modes] + [
            (m, 11, "none") for m in (fc.sweep_modes if fc.sweep else [])]  # the sweep: convex pools
        total = 0.0
        for m, points, anchor in jobs:
            width, shared = stream_width(m, anchor, n_obj)
            chunk = min(points, fc.batch_points)
            total += seeds * -(-points // fc.batch_points) * mix(chunk, n, width, shared, g.max_new_tokens)
            total += points * n * seeds * speed.reward_s * n_obj
        s.estimate_s = total
    for s in plan.todo("report"):
        s.estimate_s = 1.0 + 0.5 * len(plan.modes)  # measured: 1 s on the default and tiny presets


def describe_plan(plan: Plan, est: bool = True) -> str:
    cfg = plan.cfg
    lines = [f"[bold]emorl run[/] -> {plan.run}   model {cfg.model.name}, K={len(plan.objectives)} objectives "
             f"({', '.join(plan.objectives)})"]
    titles = {"train": "1. train EMORL adapters", "baselines": "2. train baselines", "search": "3. search weights",
              "route": "3b. fit router", "evaluate": "4. evaluate", "front": "5. Pareto fronts", "report": "6. report"}
    colors = {"done": "green", "run": "yellow", "redo": "magenta", "resume": "cyan"}
    for stage, title in titles.items():
        steps = plan.stage(stage)
        if not steps and stage == "front":
            continue  # front.enabled is false
        if not steps:
            if stage == "route":
                continue
            lines.append(f"  {title:<26} (nothing: not in eval.methods)")
            continue
        units = "; ".join(f"{s.name}: [{colors[s.status]}]{'skip' if s.status == 'done' else s.status}[/]"
                          + (f" ({s.reason})" if s.reason and s.status != "done" else "") for s in steps)
        secs = sum(s.estimate_s for s in steps)
        lines.append(f"  {title:<26} {units}" + (f"   ~{duration(secs)}" if est and secs else ""))
    total = sum(s.estimate_s for s in plan.steps)
    if est:
        lines.append(f"  estimated time: ~{duration(total)} (an estimate, not a bound: decoding speed probed on this "
                     f"machine, training budgets taken in full, runs that converge stop earlier)")
    return "\n".join(lines)


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"

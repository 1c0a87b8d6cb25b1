"""The up-front time estimate of ``emorl run``: decoding speed probed on the loaded base, applied to every unit's
budget (training steps, search points, evaluation decodes) as an upper bound."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from emorl.evaluate import method_kind
from emorl.pipeline.plan import Plan


@dataclass
class Speed:
    """Decoding cost on this machine, ``a + b * rows`` seconds per generated token, from a short probe."""

    a: float
    b: float
    reward_s: float = 0.02  # scoring one reply with one reward (probed with the run's rewards where given)

    def gen(self, rows: float, tokens: float) -> float:
        return tokens * (self.a + self.b * rows)


def probe_speed(base: Any, tokens: int = 4, rewards: dict[str, Any] | None = None) -> Speed:
    """Time short forced-length generations of 2 and 48 rows, twice, with the loaded base (a few seconds).

    The per-row cost is taken at a batch of 48 rows: on a CPU it falls with the batch size, and the pipeline's
    big decodes (search rounds, rollouts) are batched; the smaller ones are slightly underestimated."""
    import torch

    ids = torch.arange(100, 124, device=base.device).repeat(48, 1)
    times: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(2):  # the faster of two tries: a short probe on a shared machine catches load spikes
            for rows in (2, 48):
                t0 = time.perf_counter()
                base.model.generate(input_ids=ids[:rows], attention_mask=torch.ones_like(ids[:rows]),
                                    do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                                    pad_token_id=base.tokenizer.pad_token_id)
                times[rows] = min(times.get(rows, float("inf")), (time.perf_counter() - t0) / tokens)
    b = max(0.0, (times[48] - times[2]) / 46)
    return Speed(a=max(1e-4, times[2] - 2 * b), b=b,
                 reward_s=probe_rewards(rewards) if rewards else REWARD_S)


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


# Calibrated on the default preset (SmolLM2-135M, 2-core CPU, bench/RESULTS.md): a k-SCST update (forward and
# backward over prompt + reply) costs 0.7x the probed per-row cost of decoding as many tokens one by one; the
# search's decoding is cheaper than the probe says (hidden/logits share one prefill per adapter across all points
# and decode ~150-row batches: 0.3x; params re-runs the prefill for every point: 0.9x); scoring one reply with one
# reward costs ~0.02 s (probed with the run's rewards where they are loaded); a search's figures ~2 s.
LOSS_FACTOR = 0.7
SEARCH_FACTOR = {"params": 0.9}
SEARCH_SHARED_PREFILL = 0.3
CONVEX_DECODED = 0.8  # share of a convex search's points decoded (36 of 46 in the default run)
REWARD_S = 0.02
PLOT_S = 2.0


def stream_width(key: str | None, anchor: str, k: int) -> tuple[int, float]:
    """(backbone rows per prompt, search decode factor) of a mix: params one merged stream (its prefill re-run per
    point); the other modes K adapter streams, plus the base stream when base-anchored."""
    if key is None:
        return 1, 1.0
    if key.startswith("params"):
        return 1, SEARCH_FACTOR["params"]
    convex = key.endswith("-convex") or key.startswith("probs") or anchor == "none"
    return k + (0 if convex else 1), SEARCH_SHARED_PREFILL


def estimate(plan: Plan, speed: Speed) -> None:
    """Fill ``estimate_s`` of every unit that must run, at the probed decoding speed, with budgets as upper bounds
    (replies at full length, training to max_steps, every search point decoded)."""
    from emorl.search.hierarchical import expected_evaluations

    cfg, t = plan.cfg, plan.cfg.train
    prompt_len = 0.6 * cfg.model.max_prompt_tokens
    k_obj = len(plan.objectives)

    from emorl.train.trainer import val_every

    def training(policies: int, strategy: str) -> float:
        rows = policies * t.batch_size * t.k
        tok = t.generation.max_new_tokens
        step = speed.gen(rows, tok) + LOSS_FACTOR * speed.b * rows * (prompt_len + tok) + speed.reward_s * rows * k_obj
        val_rows = policies * t.val_prompts * t.val_samples
        val = speed.gen(val_rows, tok) + speed.reward_s * val_rows * k_obj
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
        width, factor = stream_width(s.name, sc.anchor, k_obj)
        n = expected_evaluations(k_obj, sc.iterations)
        if width != 1 and s.name.endswith("-convex"):
            n = round(n * CONVEX_DECODED)  # points on one ray share a decode
        calls = -(-n // sc.batch_points)
        decode = n_seeds * calls * speed.gen(sc.batch_points * n_p * width, sc.generation.max_new_tokens)
        reeval = speed.gen(sc.reeval_top * n_re * width, sc.generation.max_new_tokens) if sc.reeval_top else 0.0
        s.estimate_s = (factor * (decode + reeval) + (n * n_p * n_seeds + sc.reeval_top * n_re) * speed.reward_s * k_obj
                        + PLOT_S)
    for s in plan.todo("route"):  # the lattice (plus the search's best) x the router's prompts, per seed
        from math import comb

        rc, g = cfg.route, cfg.eval.generation
        pts = comb(round(1 / rc.step) + k_obj - 1, k_obj - 1) + 1
        n = rc.prompts or 64
        s.estimate_s = len(rc.seeds) * (SEARCH_SHARED_PREFILL * speed.gen(pts * n * k_obj, g.max_new_tokens)
                                        + pts * n * speed.reward_s * k_obj)
    for s in plan.todo("evaluate"):
        from emorl.evaluate import decode_seeds

        seeds = len(decode_seeds(cfg))
        g = cfg.eval.generation
        n = cfg.eval.prompts or 64
        widths = [stream_width(method_kind(m)[1], cfg.search.anchor, k_obj)[0]
                  if method_kind(m)[0] in ("ensemble", "routed") else 1 for m in plan.methods]
        s.estimate_s = seeds * sum(speed.gen(n * w, g.max_new_tokens) + n * speed.reward_s * k_obj for w in widths)
    for s in plan.todo("front"):
        from emorl.evaluate import decode_seeds

        fc, g = cfg.front, cfg.eval.generation
        lattice = (int(round(fc.w_max / fc.step)) + 1) ** k_obj
        n = min(fc.prompts or 10**9, cfg.eval.prompts or 64)
        seeds = len(fc.seeds or decode_seeds(cfg))
        jobs = [(m, lattice, cfg.search.anchor) for m in fc.modes] + [
            (m, 11, "none") for m in (fc.sweep_modes if fc.sweep else [])]  # the sweep: convex pools
        total = 0.0
        for m, points, anchor in jobs:
            width = stream_width(m, anchor, k_obj)[0]
            chunk = min(points, fc.batch_points)
            total += seeds * -(-points // fc.batch_points) * speed.gen(chunk * n * width, g.max_new_tokens)
            total += points * n * seeds * speed.reward_s * k_obj
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
        lines.append(f"  estimated time: ~{duration(total)} at most (decoding speed probed on this machine; training "
                     f"budgets taken as upper bounds, runs that converge stop earlier)")
    return "\n".join(lines)


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"

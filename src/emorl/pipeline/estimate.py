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

    def gen(self, rows: float, tokens: float) -> float:
        return tokens * (self.a + self.b * rows)


def probe_speed(base: Any, tokens: int = 6) -> Speed:
    """Time two short forced-length generations (2 and 16 rows) with the loaded base (about a second)."""
    import torch

    ids = torch.arange(100, 124, device=base.device).repeat(16, 1)
    times = {}
    with torch.inference_mode():
        for rows in (2, 16):
            t0 = time.perf_counter()
            base.model.generate(input_ids=ids[:rows], attention_mask=torch.ones_like(ids[:rows]), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=base.tokenizer.pad_token_id)
            times[rows] = (time.perf_counter() - t0) / tokens
    b = max(0.0, (times[16] - times[2]) / 14)
    return Speed(a=max(1e-4, times[2] - 2 * b), b=b)


def estimate(plan: Plan, speed: Speed) -> None:
    """Fill ``estimate_s`` of every unit that must run: decoding at the probed speed (budgets as upper bounds:
    replies at full length, training to max_steps); the loss step as 3 forward passes over prompt + reply."""
    from emorl.search.hierarchical import expected_evaluations

    cfg, t = plan.cfg, plan.cfg.train
    prompt_len = 0.6 * cfg.model.max_prompt_tokens
    k_obj = len(plan.objectives)

    def training(policies: int) -> float:
        rows = policies * t.batch_size * t.k
        tok = t.generation.max_new_tokens
        step = speed.gen(rows, tok) + 3 * speed.b * rows * (prompt_len + tok) + 0.05 * rows
        val = speed.gen(policies * t.val_prompts * t.val_samples, tok)
        return t.max_steps * step + (t.max_steps / t.val_every + 1) * val

    train_todo = plan.todo("train")
    for s in train_todo:
        s.estimate_s = training(len(train_todo)) / len(train_todo)
    for s in plan.todo("baselines"):
        s.estimate_s = training(1)
    sc = cfg.search
    for s in plan.todo("search"):
        width = 1 if s.name == "params" else k_obj
        n = expected_evaluations(k_obj, sc.iterations)
        calls = -(-n // sc.batch_points)
        s.estimate_s = calls * speed.gen(sc.batch_points * sc.prompts * width, sc.generation.max_new_tokens)
    for s in plan.todo("evaluate"):
        from emorl.evaluate import decode_seeds

        seeds = len(decode_seeds(cfg))
        g = cfg.eval.generation
        n = cfg.eval.prompts or 64
        widths = [k_obj if method_kind(m)[0] == "ensemble" and method_kind(m)[1] != "params" else 1
                  for m in plan.methods]
        s.estimate_s = seeds * sum(speed.gen(n * w, g.max_new_tokens) for w in widths)
    for s in plan.todo("report"):
        s.estimate_s = 5.0


def describe_plan(plan: Plan, est: bool = True) -> str:
    cfg = plan.cfg
    lines = [f"[bold]emorl run[/] -> {plan.run}   model {cfg.model.name}, K={len(plan.objectives)} objectives "
             f"({', '.join(plan.objectives)})"]
    titles = {"train": "1. train EMORL adapters", "baselines": "2. train baselines", "search": "3. search weights",
              "evaluate": "4. evaluate", "report": "5. report"}
    colors = {"done": "green", "run": "yellow", "redo": "magenta", "resume": "cyan"}
    for stage, title in titles.items():
        steps = plan.stage(stage)
        if not steps:
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

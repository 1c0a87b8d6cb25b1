"""The training loop: K policies (one LoRA adapter each) trained with k-SCST on one shared frozen base.

Strategy ``single`` (EMORL) makes one policy per objective; the baselines make one policy on all objectives.
Every step, the rollouts of all policies still training are sampled in one batched generation; then each
policy scores its own replies, computes its advantages and takes its own optimizer step. Each policy stops on
its own: convergence (coefficient of variation of its last N validation means below a threshold) or budget.

Every random choice of a policy is seeded statelessly by (train.seed, policy name, step, purpose): LoRA init,
data order, rollout and validation sampling, LoRA dropout. So a policy trains to the same weights whichever
other policies share the process (exactly, with the separate update; see docs/method.md).

Run folder: ``adapters/<objective>/`` (single) or ``baselines/<strategy>/`` (peft format + emorl.json),
``checkpoints/<run>/`` (resume), ``logs/<run>.jsonl`` (metrics), ``logs/train.log``, ``curves/<run>.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorl.config import RunConfig
from emorl.layer_spec import recorded_layers
from emorl.models import AdapterInfo, Base, add_adapters
from emorl.sampling import stable_seed
from emorl.train import full as full_ft
from emorl.train import resume as resume_mod
from emorl.train.monitor import MetricsLogger, Progress
from emorl.train.policy import Policy, coefficient_of_variation_converged, val_every
from emorl.train.rollout import Rollout, prompt_width, sample_rollouts
from emorl.train.strategies import make_weighting
from emorl.train.update import PolicyUpdates
from emorl.utils import EmorlError, atomic_write_json, set_seed

log = logging.getLogger("emorl.train")

RESUMABLE_CHANGES = resume_mod.RESUMABLE_CHANGES  # re-exported: config keys a resume may change


class Trainer(PolicyUpdates):
    """Train the policies of one strategy into ``run_dir``. Pass ``base``/``rewards``/``splits`` to reuse them."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, base: Base | None = None,
                 rewards: dict[str, Callable] | None = None, splits: Any = None, progress: bool = True,
                 force: bool = False, callbacks: list[Callable[[Trainer], None]] | None = None,
                 val_objectives: list[str] | None = None, strategies: list[str] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # several baseline strategies train together (one batched rollout per step), like the K adapters
        self.strategies = list(dict.fromkeys(strategies or [cfg.train.strategy]))
        if "single" in self.strategies and len(self.strategies) > 1:
            raise EmorlError("the objective adapters (strategy single) train apart from the baselines")
        self.strategy = self.strategies[0] if len(self.strategies) == 1 else "+".join(self.strategies)
        self.objectives = cfg.trained_objectives()
        self.progress = progress
        self.force = force
        self.callbacks = callbacks or []
        self.objectives_all = list(val_objectives or self.objectives)  # scored at validation
        for o in self.objectives_all:
            if o not in cfg.objectives:
                raise EmorlError(f"validation objective {o!r} is not in objectives ({', '.join(cfg.objectives)})")
        self._stop = threading.Event()
        # cheap checks and data first: bad input fails before any model is loaded
        if splits is None:
            from emorl.data import load_splits

            splits = load_splits(cfg.data)
        if not splits.train:
            raise EmorlError("the training split is empty: add data or change data.split")
        if not splits.validation:
            raise EmorlError("the validation split is empty: add data or raise data.split[1]")
        self.train_records = splits.train
        self.val_statements = [r.prompt for r in splits.validation[: cfg.train.val_prompts]]
        self.base = base
        self.rewards = rewards
        tag = self.strategy if self.strategy != "single" else "single-" + "+".join(self.objectives)
        self.tag = tag
        self.ckpt_dir = self.run_dir / "checkpoints" / tag
        self.policies: list[Policy] = []
        self.step_times: list[dict[str, float]] = []  # per step: rollout / update / total seconds (benchmarks)

    # ------------------------------------------------------------------------------------------ set-up
    def _output_dir(self, name: str) -> Path:
        sub = "adapters" if self.strategies == ["single"] else "baselines"
        return self.run_dir / sub / name

    def _finished(self, out: Path) -> bool:
        info = out / "emorl.json"
        if not info.exists() or self.force:
            return False
        import json

        return bool(json.loads(info.read_text()).get("extra", {}).get("finished"))

    def setup(self) -> None:
        from emorl.models import load_base

        if self.base is None:
            self.base = load_base(self.cfg.model)
        if self.rewards is None:
            from emorl.rewards import build_rewards

            self.rewards = build_rewards({o: self.cfg.objectives[o] for o in self.objectives_all}, self.base)
        missing = [o for o in self.objectives_all if o not in self.rewards]
        if missing:
            raise EmorlError(f"no reward for objectives {missing}")
        t = self.cfg.train
        single = self.strategies == ["single"]
        groups = [[o] for o in self.objectives] if single else [self.objectives] * len(self.strategies)
        names = [g[0] for g in groups] if single else list(self.strategies)
        todo = [(n, g) for n, g in zip(names, groups, strict=True) if not self._finished(self._output_dir(n))]
        for n, _ in zip(names, groups, strict=True):
            if (n, _) not in todo:
                log.info("%s: already trained (%s), skipping; pass --force to retrain", n, self._output_dir(n))
        if not todo:
            return
        set_seed(t.seed)
        full = full_ft.wants_full(self.cfg, self.strategies[0])
        if self.cfg.lora.full_finetune and not full:
            log.warning("lora.full_finetune applies to the baselines only; EMORL trains LoRA adapters")
        if not full:
            from peft import PeftModel

            if isinstance(self.base.model, PeftModel):
                for n, _ in todo:
                    if n in self.base.model.peft_config:
                        self.base.model.delete_adapter(n)
            add_adapters(self.base, [n for n, _ in todo], self.cfg.lora, seed=t.seed)
        for i, (n, objs) in enumerate(todo):
            own = None
            if full:  # a second copy of the base: the frozen one stays the rewards' and the KL's reference
                own, params = full_ft.own_model(self.cfg)
            else:
                params = {k: p for k, p in self.base.model.named_parameters()
                          if "lora_" in k and k.endswith(f".{n}.weight")}
            for p in params.values():
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params.values(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
            strategy = "single" if single else n
            w = make_weighting(strategy, objs, fixed_weights=t.fixed_weights, gamma=t.dynaopt_gamma,
                               history=t.dynaopt_history, seed=t.seed)
            self.policies.append(Policy(n, i, objs, w, params, opt, self._output_dir(n), model=own, strategy=strategy))
        mx = self.cfg.model.max_prompt_tokens  # rollouts pad prompts to their split's longest (batch-independent)
        self._widths = {"train": prompt_width(self.base, [r.prompt for r in self.train_records], mx),
                        "validate": prompt_width(self.base, self.val_statements, mx)}

    # ------------------------------------------------------------------------------------------ data
    def _next_prompts(self, p: Policy, n: int) -> list[str]:
        """Deterministic epoch-wise shuffles, one stream per policy name; (epoch, pos) is checkpointed."""
        out: list[str] = []
        total = len(self.train_records)
        while len(out) < n:
            perm = np.random.default_rng([self.cfg.train.seed, stable_seed(p.name, "data"), p.epoch]).permutation(total)
            take = min(n - len(out), total - p.pos)
            out.extend(self.train_records[i].prompt for i in perm[p.pos:p.pos + take])
            p.pos += take
            if p.pos >= total:
                p.epoch, p.pos = p.epoch + 1, 0
        return out

    # ------------------------------------------------------------------------------------------ rollouts
    def _rollouts(self, groups: list[tuple[Policy, list[str]]], k: int, purpose: str = "train",
                  gen: Any = None) -> list[Rollout]:
        """LoRA policies share one batched generation; a fully fine-tuned policy generates with its own model.
        Each policy samples with uniforms seeded by (seed, name, step) — validation: (seed, name), the same
        numbers at every validation (common random numbers)."""
        t, out = self.cfg.train, {}
        gen = gen or t.generation
        seed = {p.name: stable_seed(t.seed, p.name, *([p.step] if purpose == "train" else []), purpose)
                for p, _ in groups}
        kw = {"prompt_width": self._widths[purpose]}
        shared = [(p.name, s) for p, s in groups if p.model is None]
        if shared:
            for ro in sample_rollouts(self.base.model, self.base, shared, k, gen, self.cfg.model.max_prompt_tokens,
                                      [seed[n] for n, _ in shared], **kw):
                out[ro.adapter] = ro
        for p, s in groups:
            if p.model is not None:
                out[p.name] = sample_rollouts(p.model, self.base, [(p.name, s)], k, gen,
                                              self.cfg.model.max_prompt_tokens, [seed[p.name]], **kw)[0]
        return [out[p.name] for p, _ in groups]

    def _validate(self, policies: list[Policy], metrics: MetricsLogger) -> None:
        """Sample replies to the fixed validation prompts for every policy at once; record per-objective means."""
        if not policies:
            return
        t = self.cfg.train
        groups = [(p, self.val_statements) for p in policies]
        if t.val_greedy:
            ros = self._rollouts(groups, 1, "validate", dataclasses.replace(t.generation, do_sample=False))
        else:
            ros = self._rollouts(groups, t.val_samples, "validate")
        for p, ro in zip(policies, ros, strict=True):
            scores = self._score(self.objectives_all, ro.prompts_per_reply, ro.texts)
            means = {o: float(scores[:, j].mean()) for j, o in enumerate(self.objectives_all)}
            value = float(np.mean([means[o] for o in p.objectives]))
            p.curve.append({"step": p.step, "prompts": p.prompts, "time": round(time.time() - self._t0, 3),
                            "scores": means, "value": value})
            p.weighting.on_validation(means)
            pre = f"{p.name}/" if len(self.policies) > 1 else ""
            metrics.log({"policy": p.name, "step": p.step, "prompts": p.prompts, f"{pre}val/value": value,
                         **{f"{pre}val/rewards/{o}/mean": v for o, v in means.items()}}, p.step)
            vals = [c["value"] for c in p.curve]
            if coefficient_of_variation_converged(vals, t.convergence_window, t.convergence_threshold):
                p.converged, p.stop_reason = True, f"converged (CV < {t.convergence_threshold})"

    def _budget_left(self, p: Policy) -> bool:
        t = self.cfg.train
        if p.step >= t.max_steps:
            p.stop_reason = p.stop_reason or f"step budget ({t.max_steps})"
            return False
        if t.max_prompts is not None and p.prompts >= t.max_prompts:
            p.stop_reason = p.stop_reason or f"prompt budget ({t.max_prompts})"
            return False
        return not p.converged

    # ------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The trainer's JSON state for a checkpoint: the config signature, the time trained so far, and each
        policy's counters (the tensors are saved beside it by :mod:`emorl.train.checkpoint`)."""
        return {"signature": resume_mod.config_signature(self), "elapsed": time.time() - self._t0,
                "policies": {p.name: p.state() for p in self.policies}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; refused if the config changed beyond RESUMABLE_CHANGES."""
        resume_mod.check_signature(self, state["signature"])
        for p in self.policies:
            p.load_state(state["policies"][p.name])
        self._t0 = time.time() - state["elapsed"]

    @property
    def stopped(self) -> bool:
        """True once a stop was requested (Ctrl-C or :meth:`request_stop`)."""
        return self._stop.is_set()

    def _checkpoint(self) -> None:
        resume_mod.write_checkpoint(self)

    def _resume(self) -> bool:
        return resume_mod.resume(self)

    def _save_policy(self, p: Policy, finished: bool) -> None:
        info = AdapterInfo(
            objective=p.name if p.strategy == "single" else "+".join(p.objectives), strategy=p.strategy,
            objectives=p.objectives, rewards={o: self.cfg.objectives[o] for o in p.objectives},
            base=self.base.identity, steps=p.step, prompts_consumed=p.prompts, wall_time_s=round(p.active_time, 2),
            converged=p.converged, curve=p.curve, prompt=self.base.prompt_format,
            extra={"finished": finished, "stop_reason": p.stop_reason, "lora": self.cfg.to_dict()["lora"],
                   "layers": recorded_layers(self.base.model, p.name),
                   "train": {**self.cfg.to_dict()["train"], "strategy": p.strategy},
                   "weights_log": getattr(p.weighting, "log", None)})
        full_ft.save_policy(self.base, p.name, p.model, p.output, info)

    # ------------------------------------------------------------------------------------------ main loop
    def _install_sigint(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop.is_set():
                raise KeyboardInterrupt
            log.warning("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")
            self._stop.set()

        return signal.signal(signal.SIGINT, handler)

    def request_stop(self) -> None:
        self._stop.set()

    def train(self, resume: bool = False) -> dict[str, AdapterInfo]:
        """Run until every policy converged or spent its budget; returns the saved adapters' metadata."""
        self.setup()
        if not self.policies:
            return {}
        cfg, t = self.cfg, self.cfg.train
        self._t0 = time.time()
        self._last_reward: dict[str, float] = {}
        if resume:
            self._resume()
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(self.run_dir / "logs" / f"{self.tag}.jsonl", t.report_to, self.tag, cfg.to_dict())
        old_handler = self._install_sigint()
        try:
            with Progress(self.progress).run() as bars:
                for p in self.policies:
                    bars.add(p.name, t.max_steps, p.step)
                if all(not p.curve for p in self.policies):
                    self._validate(self.policies, metrics)
                while True:
                    active = [p for p in self.policies if not p.done and self._budget_left(p)]
                    for p in self.policies:
                        if not p.done and p not in active:
                            self._finish(p, metrics)
                    if not active or self._stop.is_set():
                        break
                    t_step = time.time()
                    ros = self._rollouts([(p, self._next_prompts(p, t.batch_size)) for p in active], t.k)
                    t_gen = time.time()
                    if self._joint_ok(active):
                        self._joint_update(active, ros, metrics)
                    else:
                        for p, ro in zip(active, ros, strict=True):
                            self._update(p, ro, metrics)
                    self.step_times.append({"policies": len(active), "rollout_s": t_gen - t_step,
                                            "update_s": time.time() - t_gen, "step_s": time.time() - t_step})
                    self._validate([p for p in active if p.step % val_every(t, p.strategy) == 0], metrics)
                    dt = time.time() - t_step
                    for p in active:
                        p.active_time += dt
                        val = p.curve[-1]["value"] if p.curve else float("nan")
                        bars.update(p.name, p.step, f"reward {self._last_reward.get(p.name, 0):.3f} "
                                                    f"val {val:.3f} prompts {p.prompts}")
                    if any(p.step % t.checkpoint_every == 0 for p in active):
                        self._checkpoint()
                    for cb in self.callbacks:
                        cb(self)
            if self._stop.is_set():
                self._checkpoint()
                log.warning("stopped: checkpoint written to %s; continue with --resume", self.ckpt_dir)
                return {}
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            metrics.close()
        self._write_curves()
        import shutil

        shutil.rmtree(self.ckpt_dir, ignore_errors=True)  # every policy is saved as a finished adapter
        from emorl.models import read_adapter_info

        return {p.name: read_adapter_info(p.output) for p in self.policies}

    def _finish(self, p: Policy, metrics: MetricsLogger) -> None:
        """A policy stopped: make sure its last point is validated, then save it as a finished adapter."""
        if not p.curve or p.curve[-1]["step"] != p.step:
            self._validate([p], metrics)
        p.done = True
        self._save_policy(p, finished=True)
        log.info("%s: done after %d steps, %d prompts, %.0f s (%s)", p.name, p.step, p.prompts, p.active_time,
                 p.stop_reason)

    def _write_curves(self) -> None:
        atomic_write_json(self.run_dir / "curves" / f"{self.tag}.json",
                          {p.name: {"objectives": p.objectives, "curve": p.curve, "steps": p.step,
                                    "prompts": p.prompts, "wall_time_s": p.active_time, "converged": p.converged,
                                    "stop_reason": p.stop_reason} for p in self.policies})


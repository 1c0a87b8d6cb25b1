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

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorl.config import RunConfig
from emorl.models import AdapterInfo, Base, add_adapters
from emorl.sampling import seeded_rng, stable_seed
from emorl.train import full as full_ft
from emorl.train import resume as resume_mod
from emorl.train.kscst import (
    Warp,
    gdpo_advantages,
    group_advantages,
    joint_policy_gradient_step,
    policy_gradient_step,
    sampling_warp,
    transform_rewards,
)
from emorl.train.monitor import MetricsLogger, Progress
from emorl.train.rollout import Rollout, prompt_width, sample_rollouts
from emorl.train.strategies import Weighting, make_weighting
from emorl.utils import EmorlError, atomic_write_json, set_seed

log = logging.getLogger("emorl.train")

RESUMABLE_CHANGES = resume_mod.RESUMABLE_CHANGES  # re-exported: config keys a resume may change


@dataclass
class Policy:
    """One trainable adapter and its bookkeeping (all JSON-serialisable except weighting/optimizer/params)."""

    name: str
    index: int
    objectives: list[str]
    weighting: Weighting
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    output: Path
    model: Any = None  # full fine-tuning: the policy's own copy of the base (None: a LoRA adapter on the base)
    strategy: str = "single"
    step: int = 0
    prompts: int = 0
    epoch: int = 0
    pos: int = 0
    active_time: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    converged: bool = False
    done: bool = False
    stop_reason: str = ""

    def state(self) -> dict[str, Any]:
        keys = ("step", "prompts", "epoch", "pos", "active_time", "curve", "converged", "done", "stop_reason")
        return {k: getattr(self, k) for k in keys} | {"weighting": self.weighting.state_dict()}

    def load_state(self, st: dict[str, Any]) -> None:
        for k, v in st.items():
            if k == "weighting":
                self.weighting.load_state_dict(v)
            else:
                setattr(self, k, v)


def val_every(t: Any, strategy: str) -> int:
    """Steps between validations: DynaOpt's round length where set (its weights follow validation), else
    ``train.val_every`` (a curve only)."""
    return (t.dynaopt_val_every or t.val_every) if strategy == "dynaopt" else t.val_every


def coefficient_of_variation_converged(values: list[float], window: int, threshold: float) -> bool:
    """The paper's rule: std/mean (population std) of the last ``window`` validation means below ``threshold``."""
    if threshold <= 0 or len(values) < window:
        return False
    v = np.asarray(values[-window:], dtype=float)
    mean = v.mean()
    return bool(mean > 0 and v.std() / mean < threshold)


class Trainer:
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

    # ------------------------------------------------------------------------------------------ scoring
    def _score(self, objectives: list[str], prompts: list[str], replies: list[str]) -> np.ndarray:
        from emorl.rewards import score

        return np.stack([score(self.rewards[o], prompts, replies) for o in objectives], axis=1)

    # ------------------------------------------------------------------------------------------ steps
    def _advantages(self, p: Policy, ro: Rollout) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        """Score one policy's replies -> (scores (n, J), λ, rewards (n,), k-SCST advantages)."""
        t = self.cfg.train
        scores = self._score(p.objectives, ro.prompts_per_reply, ro.texts)
        p.weighting.before_step()  # once per training step: DynaOpt opens its round here
        lam = p.weighting.weights()
        rewards = transform_rewards(scores, lam, t.reward_transform, t.clip_min, t.clip_max)
        if getattr(p.weighting, "per_reward_advantages", False):  # GDPO: normalise each reward, then sum
            per = np.stack([transform_rewards(scores[:, j], np.ones(1), t.reward_transform, t.clip_min, t.clip_max)
                            for j in range(scores.shape[1])], axis=1)
            adv = gdpo_advantages(torch.tensor(per, dtype=torch.float32, device=self.base.device), ro.batch.k)
            return scores, lam, rewards, adv
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float32, device=self.base.device), ro.batch.k)
        return scores, lam, rewards, adv

    def _update(self, p: Policy, ro: Rollout, metrics: MetricsLogger) -> None:
        """Score, then one optimizer step of one policy (its own forward/backward)."""
        t = self.cfg.train
        scores, lam, rewards, adv = self._advantages(p, ro)
        model, reference = full_ft.policy_model(self.base, p.name, p.model)
        for q in p.params.values():
            q.requires_grad_(True)
        model.train()
        try:
            with self._autocast(), seeded_rng(stable_seed(t.seed, p.name, p.step, "update"), self.base.device):
                stats = policy_gradient_step(
                    model, ro.batch, adv, is_seq2seq=self.base.is_seq2seq, micro_batch_rows=t.micro_batch_size,
                    decoder_start_id=getattr(self.base.model.config, "decoder_start_token_id", None),
                    kl_coef=t.kl_coef, reference=reference, warp=self._warp())
            self._optimizer_step(p, stats, scores, lam, rewards, ro, metrics)
        finally:
            p.optimizer.zero_grad(set_to_none=True)
            model.eval()

    def _warp(self) -> Warp | None:
        """The rollouts' sampling warpers: the loss scores the distribution the replies were sampled from."""
        g = self.cfg.train.generation
        return sampling_warp(g.temperature, g.top_k, g.top_p) if g.do_sample else None

    def _autocast(self) -> Any:
        """bf16 autocast for the update on CUDA (train.autocast); a no-op on CPU."""
        on = self.cfg.train.autocast and self.base.device.type == "cuda"
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def _joint_ok(self, active: list[Policy]) -> bool:
        """The K adapters' updates can share one forward/backward (LoRA bank) — see train.joint_update."""
        t = self.cfg.train
        return (t.joint_update and len(active) > 1 and not self.base.is_seq2seq and t.kl_coef == 0
                and all(p.model is None for p in active))

    def _joint_update(self, active: list[Policy], ros: list[Rollout], metrics: MetricsLogger) -> None:
        """Score every policy, then one forward/backward over all their rows, then each optimizer steps."""
        t = self.cfg.train
        model = self.base.model
        parts = [self._advantages(p, ro) for p, ro in zip(active, ros, strict=True)]
        for p in active:
            for q in p.params.values():
                q.requires_grad_(True)
        model.train()
        seed = stable_seed(t.seed, active[0].step, "joint-update", *[p.name for p in active])
        try:
            with self._autocast(), seeded_rng(seed, self.base.device):
                stats = joint_policy_gradient_step(model, [ro.batch for ro in ros], [a[3] for a in parts],
                                                   [p.name for p in active], micro_batch_rows=t.micro_batch_size,
                                                   warp=self._warp())
            for p, ro, st, (scores, lam, rewards, _) in zip(active, ros, stats, parts, strict=True):
                self._optimizer_step(p, st, scores, lam, rewards, ro, metrics)
        finally:
            for p in active:
                p.optimizer.zero_grad(set_to_none=True)
            model.eval()

    def _optimizer_step(self, p: Policy, stats: dict[str, float], scores: np.ndarray, lam: np.ndarray,
                        rewards: np.ndarray, ro: Rollout, metrics: MetricsLogger) -> None:
        t = self.cfg.train
        grad_norm = torch.nn.utils.clip_grad_norm_(list(p.params.values()), t.max_grad_norm)
        p.optimizer.step()
        p.step += 1
        p.prompts += ro.batch.prompt_ids.shape[0]
        if p.step % t.log_every == 0:
            pre = f"{p.name}/" if len(self.policies) > 1 else ""
            rec: dict[str, Any] = {"policy": p.name, "step": p.step, "prompts": p.prompts,
                                   "time": time.time() - self._t0, f"{pre}loss": stats["loss"],
                                   f"{pre}grad_norm": float(grad_norm), f"{pre}reward/mean": float(rewards.mean())}
            if "kl" in stats:
                rec[f"{pre}kl"] = stats["kl"]
            for j, o in enumerate(p.objectives):
                rec[f"{pre}rewards/{o}/mean"] = float(scores[:, j].mean())
                rec[f"{pre}weights/{o}"] = float(lam[j])
            rec[f"{pre}completions/mean_length"] = float(ro.batch.completion_mask.sum(1).mean())
            metrics.log(rec, p.step)
        self._last_reward[p.name] = float(scores.mean())

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


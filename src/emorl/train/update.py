"""The k-SCST update of the policies: score the rollouts, weight the rewards, compute advantages, take each
policy's optimizer step, one forward/backward per policy or one for all of them (the LoRA bank), and log it.

A mixin of :class:`~emorl.train.trainer.Trainer` (it reads the trainer's config, base, rewards and clock).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emorl.sampling import seeded_rng, stable_seed
from emorl.train import full as full_ft
from emorl.train.kscst import (
    Warp,
    gdpo_advantages,
    group_advantages,
    joint_policy_gradient_step,
    policy_gradient_step,
    sampling_warp,
    transform_rewards,
)

if TYPE_CHECKING:
    from emorl.train.monitor import MetricsLogger
    from emorl.train.policy import Policy
    from emorl.train.rollout import Rollout


class PolicyUpdates:
    """The update half of the trainer (see the module docstring)."""

    cfg: Any
    base: Any
    policies: list[Policy]
    rewards: Any
    _t0: float
    _last_reward: dict[str, float]

    def _score(self, objectives: list[str], prompts: list[str], replies: list[str]) -> np.ndarray:
        from emorl.rewards import score

        return np.stack([score(self.rewards[o], prompts, replies) for o in objectives], axis=1)

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

"""Reward-weighting strategies: how one policy turns J objective scores into one reward per reply.

* ``single`` — EMORL: one policy per objective, λ = [1].
* ``uniform`` — Uniform Weighted baseline: one policy, λ_j = 1/J over the log rewards.
* ``fixed`` — one policy, user-given λ.
* ``gdpo`` — GDPO: one policy; each objective's reward is normalised within its prompt's k replies, and the
  normalised rewards are summed (:func:`emorl.train.kscst.gdpo_advantages`); λ = 1/J is only reported.
* ``dynaopt`` — DynaOpt (Min et al., 2024): two Exp3 bandits. An *arm* bandit with J+1 arms (one per objective
  plus "leave the weights alone") is drawn at the start and after every validation; drawing objective c
  up-weights c once in a *weight* bandit (J arms) whose normalised weights are λ. The arm bandit is rewarded with
  the mean improvement of the validation means over their recent history. One weight update per round is the
  original DynaOpt semantics (EMORL's port updated on every step of a round, compounding it; spec §5.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Weighting:
    """λ for one policy's objectives; may adapt to validation results. State is JSON-serialisable."""

    def __init__(self, objectives: list[str]):
        self.objectives = list(objectives)

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def on_validation(self, means: dict[str, float]) -> None:
        """Called with the validation mean of every objective after each validation."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (nothing to restore for static weightings)."""


class FixedWeighting(Weighting):
    def __init__(self, objectives: list[str], weights: list[float] | None = None):
        super().__init__(objectives)
        w = np.full(len(objectives), 1.0 / len(objectives)) if weights is None else np.asarray(weights, float)
        if w.shape != (len(objectives),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {len(objectives)} finite non-negative numbers, not all zero: {weights}")
        self._w = w

    def weights(self) -> np.ndarray:
        return self._w


class GDPOWeighting(FixedWeighting):
    """GDPO: the advantages are per-reward group-normalised and summed (``per_reward_advantages``), not the
    k-SCST advantages of one weighted reward; λ = 1/J is the weighting it reports (and the equal sum it takes)."""

    per_reward_advantages = True

    def __init__(self, objectives: list[str]):
        super().__init__(objectives)


class Exp3:
    """The Exp3 adversarial bandit (Auer et al., 2002): p_i = (1 − γ) w_i / Σw + γ / n; w_c ← w_c exp(γ r / (p_c n))."""

    def __init__(self, n_arms: int, gamma: float):
        self.n = n_arms
        self.gamma = gamma
        self.log_w = np.zeros(n_arms)  # log-weights: the same rule without overflow over long runs

    def probs(self) -> np.ndarray:
        w = np.exp(self.log_w - self.log_w.max())
        return (1 - self.gamma) * w / w.sum() + self.gamma / self.n

    def draw(self, rng: np.random.Generator) -> int:
        return int(rng.choice(self.n, p=self.probs()))

    def update(self, arm: int, reward: float) -> None:
        p = self.probs()[arm]
        self.log_w[arm] += self.gamma * (reward / p) / self.n


class DynaOptWeighting(Weighting):
    def __init__(self, objectives: list[str], gamma: float = 0.07, history: int = 8, seed: int = 0):
        super().__init__(objectives)
        j = len(objectives)
        self.arm_bandit = Exp3(j + 1, gamma)  # arm j = "no change"
        self.weight_bandit = Exp3(j, gamma)
        self.history_len = history
        self.history: dict[str, list[float]] = {o: [] for o in objectives}
        self.rng = np.random.default_rng(seed)
        self.arm = self._draw_and_apply()
        self.log: list[dict[str, Any]] = []

    def _draw_and_apply(self) -> int:
        arm = self.arm_bandit.draw(self.rng)
        if arm < len(self.objectives):  # up-weight that objective once for this round
            self.weight_bandit.update(arm, 1.0)
        return arm

    def weights(self) -> np.ndarray:
        w = np.exp(self.weight_bandit.log_w - self.weight_bandit.log_w.max())
        return w / w.sum()

    def bandit_reward(self, means: dict[str, float]) -> float:
        """Mean over objectives of (current validation mean − mean of its recent history); 0 with no history."""
        if not any(self.history[o] for o in self.objectives):
            return 0.0
        return float(np.mean([means[o] - np.mean(self.history[o]) for o in self.objectives if self.history[o]]))

    def on_validation(self, means: dict[str, float]) -> None:
        r = self.bandit_reward(means)
        self.arm_bandit.update(self.arm, r)
        for o in self.objectives:
            self.history[o] = (self.history[o] + [float(means[o])])[-self.history_len:]
        self.log.append({"arm": self.arm, "reward": r, "weights": self.weights().tolist()})
        self.arm = self._draw_and_apply()

    def state_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "arm_log_w": self.arm_bandit.log_w.tolist(),
                "weight_log_w": self.weight_bandit.log_w.tolist(), "history": self.history,
                "rng": self.rng.bit_generator.state, "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.arm = int(state["arm"])
        self.arm_bandit.log_w = np.asarray(state["arm_log_w"], float)
        self.weight_bandit.log_w = np.asarray(state["weight_log_w"], float)
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.rng.bit_generator.state = state["rng"]
        self.log = list(state.get("log", []))


def make_weighting(strategy: str, objectives: list[str], *, fixed_weights: list[float] | None = None,
                   gamma: float = 0.07, history: int = 8, seed: int = 0) -> Weighting:
    if strategy == "single":
        if len(objectives) != 1:
            raise ValueError("strategy 'single' trains one objective per policy")
        return FixedWeighting(objectives, [1.0])
    if strategy == "uniform":
        return FixedWeighting(objectives)
    if strategy == "fixed":
        return FixedWeighting(objectives, fixed_weights)
    if strategy == "gdpo":
        return GDPOWeighting(objectives)
    if strategy == "dynaopt":
        return DynaOptWeighting(objectives, gamma=gamma, history=history, seed=seed)
    raise ValueError(f"unknown strategy {strategy!r}")

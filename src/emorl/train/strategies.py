"""Reward-weighting strategies: how one policy turns J objective scores into one reward per reply.

* ``single`` — EMORL: one policy per objective, λ = [1].
* ``uniform`` — Uniform Weighted baseline: one policy, λ_j = 1/J over the log rewards.
* ``fixed`` — one policy, user-given λ.
* ``gdpo`` — GDPO: one policy; each objective's reward is normalised within its prompt's k replies, the
  normalised rewards are summed and the sum is normalised over the batch (:func:`emorl.train.kscst.gdpo_advantages`);
  λ = 1/J is only reported.
* ``dynaopt`` — DynaOpt (Min et al., 2024): two Exp3 bandits. An *arm* bandit with J+1 arms (one per objective
  plus "leave the weights alone") picks, once per round, which objective to up-weight once in a *weight* bandit
  (J arms) whose normalised weights are λ. See :class:`DynaOptWeighting` for the round bookkeeping and the
  reward rule. One weight update per round is the original DynaOpt semantics (EMORL's port updated on every step
  of a round, compounding it; spec §5.2).
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

    def before_step(self) -> None:
        """Called once before each training step's rewards are weighted (adaptive weightings update here)."""

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
    """GDPO: the advantages are per-reward group-normalised, summed and batch-normalised
    (``per_reward_advantages``), not the k-SCST advantages of one weighted reward; λ = 1/J is the weighting it
    reports (and the equal sum it takes)."""

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
    """DynaOpt's two bandits, with one weight update per round.

    A *round* is the training steps between two validations. The bookkeeping:

    * the first round (up to the first validation after a training step) runs on uniform λ with no arm: nothing
      changes the weights before the first update, and a validation before any step (the trainer's step-0
      validation) only records the history the first reward is measured against;
    * the validation that closes a round credits that round's arm with the round's reward;
    * the first training step of the next round draws the next arm and, if it is an objective, up-weights it once
      in the weight bandit. So training that stops after a validation leaves no unused round (and no weight update
      after the last training step).

    The arm bandit's reward is :meth:`unit_reward` of :meth:`bandit_reward`: Exp3 assumes rewards in [0, 1].
    """

    def __init__(self, objectives: list[str], gamma: float = 0.07, history: int = 8, seed: int = 0):
        super().__init__(objectives)
        j = len(objectives)
        self.arm_bandit = Exp3(j + 1, gamma)  # arm j = "no change"
        self.weight_bandit = Exp3(j, gamma)
        self.history_len = history
        self.history: dict[str, list[float]] = {o: [] for o in objectives}
        self.rng = np.random.default_rng(seed)
        self.arm: int | None = None  # the current round's arm; None in the first round
        self.round_closed = False  # a validation closed a round: the next step opens one (draws an arm)
        self.steps_in_round = 0
        self.log: list[dict[str, Any]] = []

    def weights(self) -> np.ndarray:
        w = np.exp(self.weight_bandit.log_w - self.weight_bandit.log_w.max())
        return w / w.sum()

    def before_step(self) -> None:
        if self.round_closed:
            self.round_closed = False
            self.arm = self.arm_bandit.draw(self.rng)
            if self.arm < len(self.objectives):  # up-weight that objective once for this round
                self.weight_bandit.update(self.arm, 1.0)
        self.steps_in_round += 1

    def bandit_reward(self, means: dict[str, float]) -> float:
        """Mean over objectives of (current validation mean − mean of its recent history); 0 with no history."""
        if not any(self.history[o] for o in self.objectives):
            return 0.0
        return float(np.mean([means[o] - np.mean(self.history[o]) for o in self.objectives if self.history[o]]))

    @staticmethod
    def unit_reward(improvement: float) -> float:
        """The improvement mapped into [0, 1] for Exp3: (1 + d) / 2, clipped. With scores in [0, 1] (every built-in
        reward) d lies in [−1, 1], so the map is affine and keeps the order of rounds; no change gives 1/2."""
        return float(np.clip((1.0 + improvement) / 2.0, 0.0, 1.0))

    def on_validation(self, means: dict[str, float]) -> None:
        entry: dict[str, Any] = {"arm": None, "reward": None}
        if self.steps_in_round > 0:  # a round ended: credit its arm (the first round has none)
            d = self.bandit_reward(means)
            if self.arm is not None:
                r = self.unit_reward(d)
                self.arm_bandit.update(self.arm, r)
                entry = {"arm": self.arm, "improvement": d, "reward": r}
            self.round_closed = True
            self.steps_in_round = 0
        for o in self.objectives:
            self.history[o] = (self.history[o] + [float(means[o])])[-self.history_len:]
        self.log.append(entry | {"weights": self.weights().tolist()})

    def state_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "round_closed": self.round_closed, "steps_in_round": self.steps_in_round,
                "arm_log_w": self.arm_bandit.log_w.tolist(), "weight_log_w": self.weight_bandit.log_w.tolist(),
                "history": self.history, "rng": self.rng.bit_generator.state, "log": self.log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.arm = None if state["arm"] is None else int(state["arm"])
        self.round_closed = bool(state["round_closed"])
        self.steps_in_round = int(state["steps_in_round"])
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

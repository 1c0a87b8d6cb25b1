"""One trained policy's state (:class:`Policy`: its adapter's parameters, optimizer, counters, curve) and the rules
that decide when it validates and when it has converged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorl.train.strategies import Weighting


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

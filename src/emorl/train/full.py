"""Full fine-tuning of a baseline (``lora.full_finetune``): the policy trains its own copy of the base.

The frozen base stays the rewards' and the KL penalty's reference; a LoRA policy instead uses its own base with
the adapter disabled. EMORL itself always trains LoRA adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from emorl.config import RunConfig
from emorl.models import Base, as_reference


def wants_full(cfg: RunConfig, strategy: str) -> bool:
    """Full fine-tuning applies to the one-policy baselines only."""
    return cfg.lora.full_finetune and strategy != "single"


def own_model(cfg: RunConfig) -> tuple[Any, dict[str, torch.nn.Parameter]]:
    """A second copy of the base and all its parameters (the policy's trainable weights)."""
    from emorl.models import load_base

    model = load_base(cfg.model).model
    return model, dict(model.named_parameters())


def policy_model(base: Base, name: str, own: Any) -> tuple[Any, Callable[[], Any]]:
    """The module to train for one policy and a factory of its KL reference context."""
    if own is not None:
        return own, lambda: contextlib.nullcontext(base.model)
    base.model.set_adapter(name)
    return base.model, lambda: as_reference(base.model)


def save_policy(base: Base, name: str, own: Any, output: Any, info: Any) -> None:
    from emorl.models import save_adapter, save_full_model

    if own is not None:
        save_full_model(own, base.tokenizer, output, info)
    else:
        save_adapter(base.model, name, output, info)

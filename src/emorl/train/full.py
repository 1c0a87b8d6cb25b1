"""Full fine-tuning of a baseline (``lora.full_finetune``): the policy trains its own copy of the base.

The frozen base stays the rewards' and the KL penalty's reference; a LoRA policy instead uses its own base with
the adapter disabled. EMORL itself always trains LoRA adapters.

Memory: the copy is loaded straight onto the device in the run's ``model.dtype``, and its gradients and AdamW's two
moments follow that dtype: 4 × the weights per fully fine-tuned policy, on top of the frozen base (no float32 master
copy; in bfloat16 that is 8 bytes a parameter, in float32 16). On CUDA the copy is refused before loading when it
cannot fit in the free memory (docs/scale.md, "Memory").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from emorl.config import RunConfig
from emorl.models import Base, as_reference
from emorl.utils import EmorlError, resolve_device


def wants_full(cfg: RunConfig, strategy: str) -> bool:
    """Full fine-tuning applies to the one-policy baselines only."""
    return cfg.lora.full_finetune and strategy != "single"


def check_fits(cfg: RunConfig, free_bytes: int, dtype: str) -> None:
    """Refuse a full fine-tune that cannot fit, before the copy is loaded: its weights, gradients and AdamW's two
    moments (4 × the weights in ``dtype``, the one ``model.dtype`` resolves to) against the device's free memory."""
    from emorl.memory import BYTES, GIB, run_config_shape

    need = 4 * run_config_shape(cfg).params * BYTES[dtype]
    if need > free_bytes:
        raise EmorlError(f"lora.full_finetune: a trainable copy of {cfg.model.name} needs {need / GIB:.1f} GiB "
                         f"(weights, gradients and AdamW's two moments in {dtype}, before activations) but the device "
                         f"has {free_bytes / GIB:.1f} GiB free. Set model.dtype=bfloat16, train LoRA baselines "
                         f"(lora.full_finetune=false), or use a larger device")


def own_model(cfg: RunConfig) -> tuple[Any, dict[str, torch.nn.Parameter]]:
    """A second copy of the base and all its parameters (the policy's trainable weights), loaded straight onto the
    device in the run's dtype."""
    from emorl.models import load_base, load_kwargs

    device = resolve_device(cfg.model.device)
    if device.type == "cuda":
        dtype = str(load_kwargs(cfg.model, device)["dtype"]).removeprefix("torch.")
        check_fits(cfg, torch.cuda.mem_get_info(device)[0], dtype)
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

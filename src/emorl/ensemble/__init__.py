"""Ensemble decoding of K LoRA adapters (EMORL): hidden-state, logit, probability and parameter mixing.

* :class:`EnsembleModel` — one base + K adapters; ``generate(prompts, weights, mode=...)``.
* :func:`lora_bank` — run K adapters of a PeftModel as one batched forward (used by the trainer's rollouts).
* :func:`check_weights` — the weight validation every entry point shares.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emorl.ensemble.decoder import MODES, GenerationResult, check_weights
    from emorl.ensemble.lora_bank import LoraBank, lora_bank, lora_layers
    from emorl.ensemble.model import EnsembleModel, generation_kwargs

# imported on first use, so `emorl generate --help` (emorl.ensemble.cli) does not wait for torch
_LAZY = {"MODES": "decoder", "GenerationResult": "decoder", "check_weights": "decoder", "LoraBank": "lora_bank",
         "lora_bank": "lora_bank", "lora_layers": "lora_bank", "EnsembleModel": "model",
         "generation_kwargs": "model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"emorl.ensemble.{_LAZY[name]}"), name)
        globals()[name] = value  # cached; also rebinds a name its submodule's import shadowed (lora_bank)
        return value
    raise AttributeError(f"module 'emorl.ensemble' has no attribute {name!r}")

__all__ = ["MODES", "EnsembleModel", "GenerationResult", "LoraBank", "check_weights", "generation_kwargs",
           "lora_bank", "lora_layers"]

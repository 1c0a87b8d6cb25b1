"""Ensemble decoding of K LoRA adapters (EMORL): hidden-state, logit, probability and parameter mixing.

* :class:`EnsembleModel` — one base + K adapters; ``generate(prompts, weights, mode=...)``.
* :func:`lora_bank` — run K adapters of a PeftModel as one batched forward (also the rollouts).
* :func:`check_weights` — the weight validation every entry point shares.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emorl.ensemble.mixing import ANCHORS, MODES, check_weights, is_scale_invariant, weight_rule
    from emorl.ensemble.model import EnsembleModel
    from emorl.ensemble.result import GenerationResult
    from emorl.lora_bank import LoraBank, lora_bank, lora_layers

# imported on first use, so `emorl generate --help` (emorl.generate_cli) does not wait for torch
_LAZY = {"ANCHORS": "emorl.ensemble.mixing", "MODES": "emorl.ensemble.mixing",
         "GenerationResult": "emorl.ensemble.result", "check_weights": "emorl.ensemble.mixing",
         "is_scale_invariant": "emorl.ensemble.mixing", "weight_rule": "emorl.ensemble.mixing",
         "LoraBank": "emorl.lora_bank", "lora_bank": "emorl.lora_bank", "lora_layers": "emorl.lora_bank",
         "EnsembleModel": "emorl.ensemble.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cached
        return value
    raise AttributeError(f"module 'emorl.ensemble' has no attribute {name!r}")

__all__ = ["ANCHORS", "MODES", "EnsembleModel", "GenerationResult", "LoraBank", "check_weights",
           "is_scale_invariant", "lora_bank", "lora_layers", "weight_rule"]

"""Ensemble decoding of K LoRA adapters (EMORL): hidden-state, logit, probability and parameter mixing.

* :class:`EnsembleModel` — one base + K adapters; ``generate(prompts, weights, mode=...)``.
* :func:`lora_bank` — run K adapters of a PeftModel as one batched forward (also the rollouts).
* :func:`check_weights` — the weight validation every entry point shares.
"""

from emorl.ensemble.decoder import ANCHORS, MODES, GenerationResult, check_weights, is_scale_invariant, weight_rule
from emorl.ensemble.model import EnsembleModel
from emorl.lora_bank import LoraBank, lora_bank, lora_layers

__all__ = ["ANCHORS", "MODES", "EnsembleModel", "GenerationResult", "LoraBank", "check_weights",
           "is_scale_invariant", "lora_bank", "lora_layers", "weight_rule"]

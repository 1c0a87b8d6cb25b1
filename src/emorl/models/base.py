"""The loaded base model (:class:`Base`): the model, its tokenizer, its identity and prompt format; its EOS ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from emorl.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-llama", "tiny-t5")


@dataclass
class Base:
    """A loaded base model with what the rest of emorl needs to know about it."""

    model: Any  # transformers PreTrainedModel (or a PeftModel wrapping it once adapters are attached)
    tokenizer: Any
    name: str
    is_seq2seq: bool
    device: torch.device
    fingerprint: str
    config: ModelConfig = field(default_factory=ModelConfig)

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    @property
    def prompt_format(self) -> dict[str, Any]:
        """How client statements become model input (recorded in each adapter's emorl.json: decoding an adapter
        with another format is decoding another policy)."""
        form = "seq2seq" if self.is_seq2seq or not getattr(self.tokenizer, "chat_template", None) else "chat-template"
        return {"form": form, "system_prompt": self.config.system_prompt,
                "max_prompt_tokens": self.config.max_prompt_tokens}


def eos_ids(base: Base) -> list[int]:
    """The ids that end a reply: the model's generation config's EOS id(s) and the tokenizer's EOS."""
    lm = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
    ids = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, list | tuple) else [ids] if ids is not None else []
    if base.tokenizer.eos_token_id is not None and base.tokenizer.eos_token_id not in ids:
        ids.append(base.tokenizer.eos_token_id)
    return [int(i) for i in ids]

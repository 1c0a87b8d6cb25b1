"""Prompt data: records, the built-in emotional-support task, file loaders, deterministic splits, and the
formatting of a client statement into the model's input text.

Loaders raise :class:`~emorl.utils.EmorlError` naming the file and line of a malformed row before any
training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Record:
    """One prompt: the client's statement and an optional reference reply (never used by rewards)."""

    prompt: str
    reference: str | None = None


def format_prompts(
    tokenizer: Any, statements: list[str], is_seq2seq: bool, system_prompt: str | None = None
) -> list[str]:
    """Turn client statements into model input text.

    Chat models: the tokenizer's chat template with an optional system message and the generation prompt.
    Seq2seq models (and tokenizers without a chat template): ``"statement [SEP] "`` as the paper's T5 input.
    """
    if is_seq2seq or not getattr(tokenizer, "chat_template", None):
        return [f"{s} [SEP] " for s in statements]
    out = []
    for s in statements:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs.append({"role": "user", "content": s})
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def encode_prompts(tokenizer: Any, texts: list[str], max_tokens: int, is_seq2seq: bool,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Tokenise formatted prompts: left-padded for causal models (so generation appends on the right),
    truncated from the left to ``max_tokens`` (the end of a prompt — the generation cue — is what matters)."""
    side = tokenizer.padding_side
    tside = tokenizer.truncation_side
    tokenizer.padding_side = "right" if is_seq2seq else "left"
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=is_seq2seq)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

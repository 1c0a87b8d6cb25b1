"""Sampling rollouts for several adapters in ONE batched generation.

Rows are laid out adapter-major (adapter 0's B·k rows, then adapter 1's, ...), all left-padded to one prompt
length, so a single ``generate`` call serves every policy that is still training: the shared base runs once
per step for all of them and each row gets its own adapter's LoRA delta. Sampling runs in eval mode (no
dropout) with a KV cache; the sampled ids are kept for the loss (never re-tokenised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from emorl.config import GenerationConfig
from emorl.data import encode_prompts, format_prompts
from emorl.models import Base
from emorl.train.kscst import RolloutBatch, completion_mask


@dataclass
class Rollout:
    """One adapter's rollouts: token tensors for the loss and decoded texts for the rewards."""

    adapter: str
    statements: list[str]  # B raw client statements (the rewards' `prompts`)
    batch: RolloutBatch
    texts: list[str]  # B*k decoded replies, grouped k by k

    @property
    def prompts_per_reply(self) -> list[str]:
        return [s for s in self.statements for _ in range(self.batch.k)]


def eos_ids(base: Base) -> list[int]:
    ids = base.model.generation_config.eos_token_id if hasattr(base.model, "generation_config") else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if base.tokenizer.eos_token_id is not None and base.tokenizer.eos_token_id not in ids:
        ids.append(base.tokenizer.eos_token_id)
    return [int(i) for i in ids]


@contextlib.contextmanager
def route_rows(model: Any, adapters: list[str], rows_per_adapter: int) -> Iterator[dict[str, Any]]:
    """Make ``model`` apply adapter ``adapters[i]`` to rows [i*n, (i+1)*n). Yields extra kwargs for generate().

    Uses emorl's LoRA bank when available (one base matmul, K low-rank deltas as batched matmuls); otherwise
    peft's ``adapter_names`` routing. A single adapter is simply made active."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):  # a fully fine-tuned policy: nothing to route
        yield {}
        return
    if len(adapters) == 1:
        prev = model.active_adapter
        model.set_adapter(adapters[0])
        try:
            yield {}
        finally:
            model.set_adapter(prev)
        return
    try:
        from emorl.ensemble.lora_bank import lora_bank
    except ImportError:
        lora_bank = None
    if lora_bank is not None:
        with lora_bank(model, adapters):
            yield {}
    else:
        yield {"adapter_names": [a for a in adapters for _ in range(rows_per_adapter)]}


@torch.no_grad()
def sample_rollouts(model: Any, base: Base, groups: list[tuple[str, list[str]]], k: int,
                    gen: GenerationConfig, max_prompt_tokens: int) -> list[Rollout]:
    """Sample k replies per statement for every (adapter, statements) group in one generate() call.

    All groups must have the same number of statements (rows are routed to adapters in equal blocks)."""
    sizes = {len(s) for _, s in groups}
    if len(sizes) != 1:
        raise ValueError(f"every adapter needs the same number of prompts per step, got {sorted(sizes)}")
    tok = base.tokenizer
    statements = [s for _, group in groups for s in group]
    texts = format_prompts(tok, statements, base.is_seq2seq, base.config.system_prompt)
    enc = encode_prompts(tok, texts, max_prompt_tokens, base.is_seq2seq, base.device)
    ids = enc["input_ids"].repeat_interleave(k, 0)
    mask = enc["attention_mask"].repeat_interleave(k, 0)
    rows_per_adapter = len(groups[0][1]) * k
    was_training = model.training
    model.eval()
    try:
        with route_rows(model, [a for a, _ in groups], rows_per_adapter) as extra:
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=gen.do_sample,
                temperature=gen.temperature if gen.do_sample else None,
                top_k=gen.top_k if gen.do_sample else None, top_p=gen.top_p if gen.do_sample else None,
                max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None,
                pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(base), **extra)
    finally:
        model.train(was_training)
    completions = (out[:, 1:] if base.is_seq2seq else out[:, ids.shape[1]:]).contiguous()
    if completions.shape[1] == 0:  # every row ended at once (possible with tiny models): keep one EOS token
        completions = torch.full((ids.shape[0], 1), eos_ids(base)[0], dtype=ids.dtype, device=ids.device)
    cmask = completion_mask(completions, eos_ids(base))
    decoded = tok.batch_decode(torch.where(cmask.bool(), completions, tok.pad_token_id), skip_special_tokens=True)
    decoded = [t.strip() for t in decoded]
    result = []
    n_prompts = len(groups[0][1])
    for g, (adapter, group) in enumerate(groups):
        p0, r0, r1 = g * n_prompts, g * rows_per_adapter, (g + 1) * rows_per_adapter
        batch = RolloutBatch(enc["input_ids"][p0:p0 + n_prompts], enc["attention_mask"][p0:p0 + n_prompts],
                             completions[r0:r1], cmask[r0:r1], k)
        result.append(Rollout(adapter, list(group), batch, decoded[r0:r1]))
    return result

"""Sampling rollouts for several adapters in ONE batched generation.

Rows are laid out adapter-major (adapter 0's B·k rows, then adapter 1's, ...), all left-padded to one prompt
length, so a single ``generate`` call serves every policy that is still training: the shared base runs once
per step for all of them and each row gets its own adapter's LoRA delta. Sampling runs in eval mode (no
dropout) with a KV cache; the sampled ids are kept for the loss (never re-tokenised).

Reproducible per adapter: each adapter samples with its own uniforms (:mod:`emorl.sampling`), prompts are padded
to a width that does not depend on the batch (the caller's ``prompt_width``), rows are routed through the LoRA
bank even for one adapter, and each adapter's tensors are trimmed to its own prompt and reply widths — so an
adapter gets the same rollouts, bit for bit, alone or with others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from emorl.config import GenerationConfig
from emorl.data import encode_prompts, format_prompts
from emorl.decoding import plain_generation_config
from emorl.ensemble.model import reply_text
from emorl.models import Base, eos_ids
from emorl.sampling import UniformSampler, uniforms
from emorl.train.kscst import RolloutBatch, completion_mask
from emorl.utils import EmorlError


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


@contextlib.contextmanager
def route_rows(model: Any, adapters: list[str], rows_per_adapter: int) -> Iterator[dict[str, Any]]:
    """Make ``model`` apply adapter ``adapters[i]`` to rows [i*n, (i+1)*n). Yields extra kwargs for generate().

    Uses emorl's LoRA bank (one base matmul, K low-rank deltas as batched matmuls), also for a single adapter, so
    a row's arithmetic is the same whichever adapters share the batch. LoRA kinds the bank cannot batch fall back
    to peft's own routing (``set_adapter`` / ``adapter_names``)."""
    from peft import PeftModel

    from emorl.lora_bank import lora_bank

    if not isinstance(model, PeftModel):  # a fully fine-tuned policy: nothing to route
        yield {}
        return
    with contextlib.ExitStack() as stack:
        extra: dict[str, Any] = {}
        try:
            stack.enter_context(lora_bank(model, adapters))
        except EmorlError:
            if len(adapters) > 1:
                extra = {"adapter_names": [a for a in adapters for _ in range(rows_per_adapter)]}
            else:
                prev = model.active_adapter
                model.set_adapter(adapters[0])
                stack.callback(model.set_adapter, prev)
        yield extra


def prompt_width(base: Base, statements: list[str], max_prompt_tokens: int) -> int:
    """The encoded (aligned) width of ``statements`` (a fixed ``prompt_width`` for :func:`sample_rollouts`)."""
    texts = format_prompts(base.tokenizer, statements, base.is_seq2seq, base.config.system_prompt)
    return int(encode_prompts(base.tokenizer, texts, max_prompt_tokens, base.is_seq2seq)["input_ids"].shape[1])


def stop_positions(out: torch.Tensor, start: int, width: int, tokenizer: Any, stops: list[str]) -> torch.Tensor:
    """(rows, width) bool: True where a stop string ends at reply token t, judged as ``generate``'s
    StopStringCriteria judged it (on the sequence so far, ``out[:, :start + t + 1]``), so the reply's mask ends at
    the token where generation stopped and the pads ``generate`` put after it stay out of the loss."""
    from transformers import StopStringCriteria

    crit = StopStringCriteria(tokenizer, list(stops))
    hit = torch.zeros((out.shape[0], width), dtype=torch.bool, device=out.device)
    for t in range(min(width, out.shape[1] - start)):
        hit[:, t] = crit(out[:, : start + t + 1], None).to(out.device)
    return hit


def _trim(batch: RolloutBatch, left_padded: bool) -> RolloutBatch:
    """Drop prompt columns that are padding in every row of this group and reply columns after every row's end:
    the group's tensors (and its update) then depend only on its own prompts and replies, not on the others'."""
    used = batch.prompt_mask.bool().any(0).nonzero()[:, 0]
    lo, hi = (int(used[0]), batch.prompt_ids.shape[1]) if left_padded else (0, int(used[-1]) + 1)
    width = int(batch.completion_mask.sum(1).max())
    return RolloutBatch(batch.prompt_ids[:, lo:hi], batch.prompt_mask[:, lo:hi], batch.completion_ids[:, :width],
                        batch.completion_mask[:, :width], batch.k)


@torch.no_grad()
def sample_rollouts(model: Any, base: Base, groups: list[tuple[str, list[str]]], k: int,
                    gen: GenerationConfig, max_prompt_tokens: int, seeds: list[int] | None = None,
                    prompt_width: int | None = None) -> list[Rollout]:
    """Sample k replies per statement for every (adapter, statements) group in one generate() call.

    All groups must have the same number of statements (rows are routed to adapters in equal blocks). Sampling
    uses each group's own uniforms, drawn from ``seeds[g]`` (default: seeds from the global RNG), and prompts are
    padded to ``prompt_width`` (give the longest prompt of the data): a group's rollouts then do not depend on the
    other groups (same tokens as sampling that group alone)."""
    sizes = {len(s) for _, s in groups}
    if len(sizes) != 1:
        raise ValueError(f"every adapter needs the same number of prompts per step, got {sorted(sizes)}")
    tok = base.tokenizer
    statements = [s for _, group in groups for s in group]
    texts = format_prompts(tok, statements, base.is_seq2seq, base.config.system_prompt)
    enc = encode_prompts(tok, texts, max_prompt_tokens, base.is_seq2seq, base.device, pad_to=prompt_width)
    ids = enc["input_ids"].repeat_interleave(k, 0)
    mask = enc["attention_mask"].repeat_interleave(k, 0)
    rows_per_adapter = len(groups[0][1]) * k
    sampler: dict[str, Any] = {}
    if gen.do_sample:
        from transformers import LogitsProcessorList

        if seeds is None:
            seeds = [int(torch.randint(0, 2**62, ())) for _ in groups]
        u = torch.cat([uniforms(s, rows_per_adapter, gen.max_new_tokens) for s in seeds]).to(base.device)
        sampler["logits_processor"] = LogitsProcessorList([UniformSampler(u, gen.temperature, gen.top_k, gen.top_p)])
    if gen.stop:  # transformers' StopStringCriteria, as the decoder's (emorl.ensemble): the same stopping rule
        sampler |= {"stop_strings": list(gen.stop), "tokenizer": tok}
    was_training = model.training
    model.eval()
    try:
        with route_rows(model, [a for a, _ in groups], rows_per_adapter) as extra, plain_generation_config(model):
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_k=None, top_p=None,
                max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens or None,
                pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(base), **sampler, **extra)
    finally:
        model.train(was_training)
    start = 1 if base.is_seq2seq else ids.shape[1]
    completions = out[:, start:].contiguous()
    if completions.shape[1] == 0:  # every row ended at once (possible with tiny models): keep one EOS token
        completions = torch.full((ids.shape[0], 1), eos_ids(base)[0], dtype=ids.dtype, device=ids.device)
    stopped = stop_positions(out, start, completions.shape[1], tok, gen.stop) if gen.stop else None
    cmask = completion_mask(completions, eos_ids(base), stopped)
    kept = torch.where(cmask.bool(), completions, tok.pad_token_id)
    decoded = [reply_text(tok, row, list(gen.stop), include_stop=True) for row in kept]
    result = []
    n_prompts = len(groups[0][1])
    for g, (adapter, group) in enumerate(groups):
        p0, r0, r1 = g * n_prompts, g * rows_per_adapter, (g + 1) * rows_per_adapter
        batch = RolloutBatch(enc["input_ids"][p0:p0 + n_prompts], enc["attention_mask"][p0:p0 + n_prompts],
                             completions[r0:r1], cmask[r0:r1], k)
        result.append(Rollout(adapter, list(group), _trim(batch, not base.is_seq2seq), decoded[r0:r1]))
    return result

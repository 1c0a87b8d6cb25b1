"""Model input: a client statement formatted with the model's chat template (or the paper's T5 form), then
tokenised, with an over-long statement shortened so the template around it stays whole."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class PromptText(str):
    """A formatted prompt that remembers its client statement, so :func:`encode_prompts` can shorten the statement
    (not the template around it) when the whole does not fit."""

    statement: str
    system_prompt: str | None

    def __new__(cls, text: str, statement: str, system_prompt: str | None) -> PromptText:
        obj = super().__new__(cls, text)
        obj.statement, obj.system_prompt = statement, system_prompt
        return obj


def format_prompts(
    tokenizer: Any, statements: list[str], is_seq2seq: bool, system_prompt: str | None = None
) -> list[str]:
    """Turn client statements into model input text (:class:`PromptText` strings).

    Chat models: the tokenizer's chat template with an optional system message and the generation prompt.
    Seq2seq models (and tokenizers without a chat template): ``"statement [SEP] "`` as the paper's T5 input.
    """
    if is_seq2seq or not getattr(tokenizer, "chat_template", None):
        return [PromptText(f"{s} [SEP] ", s, system_prompt) for s in statements]
    out: list[str] = []
    for s in statements:
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        msgs.append({"role": "user", "content": s})
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(PromptText(text, s, system_prompt))
    return out


_warned_truncation = False


def _n_tokens(tokenizer: Any, text: str, is_seq2seq: bool) -> int:
    return len(tokenizer(text, add_special_tokens=is_seq2seq)["input_ids"])


def fit_prompts(tokenizer: Any, texts: list[str], max_tokens: int, is_seq2seq: bool) -> list[str]:
    """Shorten the client statement (its end) of every formatted prompt longer than ``max_tokens``, keeping the
    chat template, the system prompt and the generation prompt whole. Warns once per process with the count;
    later truncations are logged at debug level. A prompt whose template alone is too long is left for
    :func:`encode_prompts`' left truncation."""
    global _warned_truncation
    out, cut = list(texts), 0
    for i, text in enumerate(texts):
        n = _n_tokens(tokenizer, text, is_seq2seq)
        if n <= max_tokens or not isinstance(text, PromptText):
            continue
        ids = tokenizer(text.statement, add_special_tokens=False)["input_ids"]
        keep = len(ids) - (n - max_tokens)
        new = None
        for _ in range(8):  # re-tokenising in context can differ by a token: shorten until it fits
            if keep <= 0:
                break
            stmt = tokenizer.decode(ids[:keep], skip_special_tokens=True).rstrip()
            cand = format_prompts(tokenizer, [stmt], is_seq2seq, text.system_prompt)[0]
            over = _n_tokens(tokenizer, cand, is_seq2seq) - max_tokens
            if over <= 0:
                new = cand
                break
            keep -= over
        if new is not None:
            out[i] = new
            cut += 1
    if cut:
        msg = (f"{cut} of {len(texts)} prompts are longer than model.max_prompt_tokens={max_tokens}: their client "
               f"statement was cut to fit (the chat template, system prompt and generation prompt are kept); raise "
               f"model.max_prompt_tokens to keep them whole")
        if _warned_truncation:
            log.debug(msg)
        else:
            _warned_truncation = True
            log.warning(msg + " (shown once; later truncations are logged at debug level)")
    return out


PAD_MULTIPLE = 16  # left padding is aligned to this many positions (see encode_prompts)


def aligned_width(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`PAD_MULTIPLE` (a causal batch's width on the CPU)."""
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def encode_prompts(tokenizer: Any, texts: list[str], max_tokens: int, is_seq2seq: bool,
                   device: torch.device | str = "cpu", pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise formatted prompts: left-padded for causal models (so generation appends on the right).
    A prompt over ``max_tokens`` loses the end of its client statement (:func:`fit_prompts`); only one whose
    template alone is too long is truncated from the left.
    ``pad_to``: pad to at least this width (a width that does not depend on the batch's other prompts).

    On the CPU a causal batch's width is rounded up to a multiple of :data:`PAD_MULTIPLE` above its longest prompt:
    a prompt's left padding then has the same length modulo 16 in every batch (attention over left padding is exact
    only at that alignment: CPU attention reduces in 16-lane vectors), and at least one pad, so attention always
    takes the masked path (a batch without padding would drop the mask and take another kernel). A prompt then
    decodes the same tokens whatever shares its batch — in bfloat16 too on a CPU without AMX, where a one-ulp
    difference flips sampled tokens (bench/RESULTS.md, "Batch-invariant bfloat16"; AMX's bf16 kernels round by row
    count, "Batch invariance on an AMX CPU")."""
    texts = fit_prompts(tokenizer, texts, max_tokens, is_seq2seq)
    side = tokenizer.padding_side
    tside = tokenizer.truncation_side
    tokenizer.padding_side = "right" if is_seq2seq else "left"
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=is_seq2seq)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    out = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    width = max(pad_to or 0, out["input_ids"].shape[1])
    # right padding (seq2seq) keeps every prompt at position 0: nothing to align; and the alignment is a CPU kernel
    # workaround (GPU attention kernels are not chosen by it): elsewhere a batch is as wide as its longest prompt
    if not is_seq2seq and torch.device(device).type == "cpu":
        # >= 1 pad in every row (attention always takes a mask); an aligned pad_to (a width this function returned
        # before) is kept as it is
        longest = out["input_ids"].shape[1]
        width = aligned_width(max(pad_to or 0, longest + 1))
    extra = width - out["input_ids"].shape[1]
    if extra > 0:
        pad = (0, extra) if is_seq2seq else (extra, 0)
        out["input_ids"] = torch.nn.functional.pad(out["input_ids"], pad, value=tokenizer.pad_token_id)
        out["attention_mask"] = torch.nn.functional.pad(out["attention_mask"], pad, value=0)
    return out

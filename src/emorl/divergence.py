"""The KL of a decoded reply to the base model, per token (the math of :mod:`emorl.kl`, below the decoder so that
the evaluation's own decode can measure it without decoding again).

At every generated position t: ``KL_t = sum_v q_t(v) (log q_t(v) - log p_t(v))``, q the distribution the method
sampled from (its scores after the sampling warpers), p the base's at the same temperature, untruncated, on the
same prefix (one teacher-forced forward, adapters disabled). A reply's value is the mean over its generated tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from emorl.config import GenerationConfig


@dataclass
class ReplyKL:
    """The per-token KL to the base of the first ``len(values)`` replies of a decode, and the seconds it took (kept
    apart from the decode's own time, so tokens/s stays the decode's)."""

    values: list[float]
    seconds: float


def sampled_logprobs(scores: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """log q: the sampled distribution of scores (N, V) after ``gen``'s warpers (-inf where truncated)."""
    from emorl.sampling import warpers

    x = scores.float()
    if gen.do_sample:
        dummy = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
        for p in warpers(gen.temperature, gen.top_k, gen.top_p):
            x = p(dummy, x)
    return torch.log_softmax(x, dim=-1)


def reference_logprobs(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """log p: the base's distribution at the sampling temperature, untruncated."""
    t = gen.temperature if gen.do_sample and gen.temperature else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1)


def token_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per row of (N, V) log-probabilities (terms with q = 0 count 0)."""
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q))
    return terms.sum(-1).clamp(min=0.0)


@torch.inference_mode()
def base_logits(base: Any, prompts: Sequence[str], tokens: torch.Tensor, micro_batch: int = 8) -> torch.Tensor:
    """The base model's logits (B, T, V) for each generated position of ``tokens`` (B, T), teacher-forced on the
    evaluation's formatted prompts, adapters disabled."""
    from emorl.models import adapters_disabled, position_ids
    from emorl.prompts import encode_prompts, format_prompts
    from emorl.utils import eval_mode

    tok = base.tokenizer
    texts = format_prompts(tok, list(prompts), base.is_seq2seq, base.config.system_prompt)
    enc = encode_prompts(tok, texts, base.config.max_prompt_tokens, base.is_seq2seq, base.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokens = tokens.to(base.device)
    T = tokens.shape[1]
    out = []
    model = base.model
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with adapters_disabled(model), eval_mode(model):
        for s in range(0, len(prompts), micro_batch):
            sl = slice(s, s + micro_batch)
            if base.is_seq2seq:
                start = getattr(lm.config, "decoder_start_token_id", None)
                start = tok.pad_token_id if start is None else start
                dec = torch.cat([torch.full((tokens[sl].shape[0], 1), start, device=tokens.device),
                                 tokens[sl, :-1]], 1)
                logits = model(input_ids=ids[sl], attention_mask=mask[sl], decoder_input_ids=dec).logits
            else:
                full = torch.cat([ids[sl], tokens[sl]], 1)
                m = torch.cat([mask[sl], torch.ones_like(tokens[sl])], 1)
                logits = model(input_ids=full, attention_mask=m, position_ids=position_ids(m)).logits[:, -T - 1:-1]
            out.append(logits.float().cpu())
    return torch.cat(out, 0)


def timed_reply_kl(base: Any, res: Any, prompts: Sequence[str], gen: GenerationConfig) -> ReplyKL:
    """:func:`reply_kl` with its wall time."""
    t0 = time.perf_counter()
    values = reply_kl(base, res, prompts, gen)
    return ReplyKL([float(v) for v in values], time.perf_counter() - t0)


def reply_kl(base: Any, res: Any, prompts: Sequence[str], gen: GenerationConfig) -> np.ndarray:
    """Per-reply mean per-token KL(q || p) of the rows of ``res`` (a one-point
    :class:`~emorl.ensemble.GenerationResult` decoded with ``output_scores``) that carry scores: the first n
    prompts, n = the scores' rows (``output_scores=n``) — ``prompts`` are those n."""
    scores = res.scores[0]  # (n, T, V): the first (only) point
    n_rows = scores.shape[0]
    tokens, lengths = res.all_token_ids[0, :n_rows], res.all_lengths[0, :n_rows]
    ref = base_logits(base, list(prompts)[:n_rows], tokens)
    T = min(scores.shape[1], ref.shape[1])
    values = np.zeros(n_rows)
    for b in range(n_rows):
        n = min(int(lengths[b]), T)
        if n == 0:
            continue
        kl = token_kl(sampled_logprobs(scores[b, :n], gen), reference_logprobs(ref[b, :n], gen))
        values[b] = float(kl.mean())
    return values

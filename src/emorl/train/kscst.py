"""k-sample self-critical sequence training (k-SCST), the RL step of EMORL — readable top to bottom.

For a batch of B prompts the policy samples k replies each. Every reply gets a scalar reward

    R = Σ_j λ_j · ln(clip(s_j, 1e-4, 0.9999))          (paper; ``transform="identity"`` uses Σ λ_j s_j)

from the raw objective scores s_j ∈ [0, 1]. The baseline of a reply is the mean reward of the k replies of the
same prompt, so the advantages of a group sum to zero. The loss is REINFORCE with that baseline:

    loss = − mean_i [ A_i · Σ_t log π(y_it | x_i, y_i<t) ]  (+ β · mean_i Σ_t KL_it)

where the sum runs over the *sampled token ids* (not a re-tokenisation of the decoded text, a bug of the
reference code), masking the prompt, the padding and everything after the first EOS, and π is the distribution
the rollouts were sampled from (logits / T, then top-k / top-p: :class:`Warp`), so the gradient is on-policy.
The optional KL term estimates KL(π‖π_ref) against the base model (adapter disabled), value and gradient of that
same KL (:func:`kscst_loss`); the reference's KL is computed under no_grad and multiplied by zero-mean
advantages, i.e. a no-op (spec §3.4).

Two things keep the update cheap on memory and time:
* log-probs of the sampled ids are ``logit[y] − logsumexp(logits)`` on the reply positions only — no
  full-vocabulary log-softmax copy and no logits for prompt positions;
* (causal models) the prompt is run once per prompt and its KV cache repeated for its k replies, so the
  shared prefix is not recomputed k times; micro-batches bound the activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LlamaForCausalLM

from emorl.models import cache_kwarg, output_cache, position_ids
from emorl.sampling import warpers

# ------------------------------------------------------------------------------------------ rewards


def transform_rewards(scores: np.ndarray, weights: np.ndarray, kind: str = "log",
                      clip_min: float = 1e-4, clip_max: float = 0.9999) -> np.ndarray:
    """Scores (n, J) of J objectives in [0, 1] and weights λ (J,) -> per-sample reward R (n,)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    weights = np.asarray(weights, dtype=np.float64)
    if kind == "log":
        scores = np.log(np.clip(scores, clip_min, clip_max))
    elif kind != "identity":
        raise ValueError(f"unknown reward transform {kind!r}")
    return scores @ weights


def group_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """k-SCST baseline: each reward minus the mean of its prompt's k rewards (rows grouped k by k)."""
    r = rewards.reshape(-1, k)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


def gdpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """GDPO (Liu et al., 2026): per-reward group-normalised advantages, summed, then normalised over the batch.

    ``rewards`` is (n, J), rows grouped k by k per prompt. (1) per objective j: (r_j − mean of the prompt's k) /
    (std of the k + eps), std unbiased as in TRL's GRPO; (2) the sum over j (TRL's
    ``multi_objective_aggregation="normalize_then_sum"``); (3) that sum minus its batch mean, over its batch std
    + eps. Step 1 keeps every objective's within-prompt ranking (normalising the sum would let the widest reward
    decide); step 3 keeps the advantage's scale independent of J, like the other policies' at one learning rate."""
    n, j = rewards.shape
    r = rewards.reshape(-1, k, j)
    std = r.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(r[:, :1])
    summed = ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).sum(dim=2).reshape(n)
    spread = summed.std() if n > 1 else summed.new_zeros(())
    return (summed - summed.mean()) / (spread + eps)


# ------------------------------------------------------------------------------------------ rollout tensors


@dataclass
class RolloutBatch:
    """Token ids of one policy's rollouts. Rows are grouped by prompt: rows [i*k, (i+1)*k) share prompt i.

    ``prompt_ids``/``prompt_mask`` hold the B distinct prompts (left-padded for causal models, right-padded for
    seq2seq encoders); ``completion_ids``/``completion_mask`` the B·k sampled replies (mask covers the tokens up to
    and including the first EOS)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B*k, T)
    completion_mask: torch.Tensor  # (B*k, T) float/bool
    k: int

    def slice_prompts(self, start: int, stop: int) -> RolloutBatch:
        k = self.k
        return RolloutBatch(self.prompt_ids[start:stop], self.prompt_mask[start:stop],
                            self.completion_ids[start * k:stop * k], self.completion_mask[start * k:stop * k], k)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int], stopped: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """1 for reply tokens up to and including the first EOS of each row, 0 after it (generate() pads finished
    rows with pad = often the EOS id itself, so "after the first EOS" is the only safe rule). ``stopped`` (rows, T)
    bool: where a stop string ends; a row's reply then ends there too (the pads after it are not in the loss)."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    if stopped is not None:
        is_eos |= stopped.to(is_eos.device)
    # number of EOS strictly before position t; keep positions with none before them
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (before == 0).to(torch.float32)


# ------------------------------------------------------------------------------------------ log-probs

CACHE_KW = cache_kwarg(LlamaForCausalLM)  # the KV-cache argument's name in this transformers version



@dataclass(frozen=True)
class Warp:
    """The rollouts' sampling warpers (temperature, then top-k / top-p: :func:`emorl.sampling.warpers`, what the
    sampler applied), so the loss scores the distribution that was sampled (on-policy for T ≠ 1 or a filter).

    The sampled token always stays in the support: the update's forward (train mode, LoRA dropout) can rank a
    sampled token just outside top-k where the rollout's forward did not, and −inf would poison the loss."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) logits and the (rows,) sampled ids -> the warped logits."""
        if self.temperature != 1.0:
            logits = logits / self.temperature
        filters = warpers(None, self.top_k, self.top_p)
        if not filters:
            return logits
        kept = filters(None, logits)
        return kept.scatter(-1, ids[:, None], logits.gather(-1, ids[:, None]))


def sampling_warp(temperature: float | None, top_k: int | None, top_p: float | None) -> Warp | None:
    """The :class:`Warp` of a generation config's sampling settings; None when sampling is plain softmax."""
    w = Warp(1.0 if temperature is None else float(temperature), int(top_k or 0), 1.0 if top_p is None else top_p)
    return None if (w.temperature, w.top_k, w.top_p) == (1.0, 0, 1.0) else w


def _gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, warp: Warp | None = None) -> torch.Tensor:
    """log softmax(warp(logits))[ids] without materialising the full log-softmax (a temperature-only warp is a
    division, top-k/top-p mask a copy of the logits)."""
    logits = logits.float()
    if warp is not None:
        logits = warp(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).reshape(logits.shape)
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def causal_token_logprobs(model: Any, batch: RolloutBatch, share_prompt: bool = True,
                          warp: Warp | None = None) -> torch.Tensor:
    """Per-token log-probs (B*k, T) of the sampled reply ids under a causal LM (with grad if enabled), of the
    ``warp``-ed distribution when given.

    ``share_prompt``: run each prompt once and repeat its KV cache for its k replies (exact: the same positions
    and mask as a full forward; tested against ``share_prompt=False``)."""
    k = batch.k
    pmask = batch.prompt_mask.long()
    cmask = batch.completion_mask.long()
    T = batch.completion_ids.shape[1]
    ppos = position_ids(pmask)
    if not share_prompt:
        ids = torch.cat([batch.prompt_ids.repeat_interleave(k, 0), batch.completion_ids], dim=1)
        mask = torch.cat([pmask.repeat_interleave(k, 0), cmask], dim=1)
        pos = position_ids(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1, use_cache=False)
        return _gather_logprobs(out.logits[:, :-1], batch.completion_ids, warp)
    # 1) the prompt once: its cache and the logits that predict the first reply token
    out = model(input_ids=batch.prompt_ids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
    first = _gather_logprobs(out.logits[:, -1].repeat_interleave(k, 0), batch.completion_ids[:, 0], warp)
    if T == 1:
        return first[:, None]
    cache = output_cache(out)
    cache.batch_repeat_interleave(k)  # differentiable: new tensors, the graph runs back to the prompt forward
    # 2) the k replies continue from the shared prefix
    full_mask = torch.cat([pmask.repeat_interleave(k, 0), cmask[:, :-1]], dim=1)
    cpos = ppos[:, -1:].repeat_interleave(k, 0) + torch.arange(1, T, device=ppos.device)
    out2 = model(input_ids=batch.completion_ids[:, :-1], attention_mask=full_mask, position_ids=cpos,
                 use_cache=True, **{CACHE_KW: cache})
    rest = _gather_logprobs(out2.logits, batch.completion_ids[:, 1:], warp)
    return torch.cat([first[:, None], rest], dim=1)


def seq2seq_token_logprobs(model: Any, batch: RolloutBatch, decoder_start_id: int,
                           warp: Warp | None = None) -> torch.Tensor:
    """Per-token log-probs (B*k, T) of the sampled reply ids under an encoder-decoder (encoder run once per prompt)."""
    k = batch.k
    enc = model.get_encoder()(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask)
    hidden = enc.last_hidden_state.repeat_interleave(k, 0)
    start = torch.full_like(batch.completion_ids[:, :1], decoder_start_id)
    dec_in = torch.cat([start, batch.completion_ids[:, :-1]], dim=1)
    out = model(encoder_outputs=(hidden,), attention_mask=batch.prompt_mask.repeat_interleave(k, 0),
                decoder_input_ids=dec_in, decoder_attention_mask=batch.completion_mask.long(), use_cache=False)
    return _gather_logprobs(out.logits, batch.completion_ids, warp)


def token_logprobs(model: Any, batch: RolloutBatch, is_seq2seq: bool, decoder_start_id: int | None = None,
                   share_prompt: bool = True, warp: Warp | None = None) -> torch.Tensor:
    if is_seq2seq:
        return seq2seq_token_logprobs(model, batch, int(decoder_start_id or 0), warp)
    return causal_token_logprobs(model, batch, share_prompt=share_prompt, warp=warp)


# ------------------------------------------------------------------------------------------ the loss


def kscst_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, n_total: int,
               ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with the k-sample mean baseline over one micro-batch.

    ``n_total`` is the number of samples in the whole batch, so summing micro-batch losses gives the batch mean.
    KL to the reference, KL(π‖π_ref) of the whole reply, value and gradient alike: the value is the k3 estimator
    exp(Δ) − Δ − 1 with Δ = log π_ref − log π per reply token (non-negative, unbiased), summed over the reply; the
    gradient is the score-function gradient of that KL, Σ_t ∇log π(y_t) · Σ_{s≥t} (log π − log π_ref)(y_s) (a
    token's own log-ratio and those it leads to; unbiased). Differentiating k3 itself would give the gradient of
    KL(π_ref‖π) instead (its expectation is −Σ π_ref ∇log π)."""
    keep = mask.bool()
    logp = torch.where(keep, logp, 0.0)  # positions after EOS may hold −inf under a top-k/top-p warp
    seq_logp = logp.sum(-1)
    pg = -(advantages.to(logp.dtype) * seq_logp).sum() / n_total
    stats = {"pg_loss": float(pg.detach())}
    loss = pg
    if ref_logp is not None and kl_coef > 0:
        delta = torch.where(keep, ref_logp.detach() - logp.detach(), 0.0)
        value = (torch.exp(delta) - delta - 1).sum(-1)
        to_go = (-delta).flip(-1).cumsum(-1).flip(-1)  # Σ_{s≥t} log π/π_ref
        surrogate = (to_go * logp).sum(-1)
        kl = value + surrogate - surrogate.detach()  # the value of k3, the gradient of KL(π‖π_ref)
        loss = loss + kl_coef * kl.sum() / n_total
        stats["kl"] = float(value.sum()) / n_total
    return loss, stats


def policy_gradient_step(model: Any, batch: RolloutBatch, advantages: torch.Tensor, *, is_seq2seq: bool,
                         micro_batch_rows: int, decoder_start_id: int | None = None, kl_coef: float = 0.0,
                         reference: Any = None, share_prompt: bool = True,
                         warp: Warp | None = None) -> dict[str, float]:
    """Accumulate the gradient of the k-SCST loss over micro-batches (the caller clips and steps).

    ``reference``: a factory of a context manager that yields the frozen reference model (for a LoRA policy: the
    same model with its adapter disabled) — used for the KL term only when ``kl_coef > 0``. ``warp``: the rollouts'
    sampling warpers; the policy's and the reference's log-probs are those of their distributions under the same
    warpers (the KL between what each would sample; the sampled token is kept in both supports, so it is finite)."""
    k = batch.k
    n_prompts = batch.prompt_ids.shape[0]
    n_total = n_prompts * k
    per_mb = max(1, micro_batch_rows // k)
    totals: dict[str, float] = {"loss": 0.0}
    for s in range(0, n_prompts, per_mb):
        mb = batch.slice_prompts(s, min(n_prompts, s + per_mb))
        adv = advantages[s * k:(s * k) + mb.completion_ids.shape[0]]
        ref = None
        if kl_coef > 0 and reference is not None:
            with torch.no_grad(), reference() as ref_model:
                ref = token_logprobs(ref_model, mb, is_seq2seq, decoder_start_id, share_prompt, warp)
        logp = token_logprobs(model, mb, is_seq2seq, decoder_start_id, share_prompt, warp)
        loss, stats = kscst_loss(logp, mb.completion_mask, adv, n_total, ref, kl_coef)
        loss.backward()
        totals["loss"] += float(loss.detach())
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v
    return totals


def joint_policy_gradient_step(model: Any, batches: list[RolloutBatch], advantages: list[torch.Tensor],
                               names: list[str], *, micro_batch_rows: int, share_prompt: bool = True,
                               warp: Warp | None = None) -> list[dict[str, float]]:
    """:func:`policy_gradient_step` for K LoRA adapters at once: one forward/backward over the K adapters' rows
    (adapter-major, routed by the LoRA bank) instead of K. The adapters' parameters are disjoint, so the summed
    loss gives each adapter exactly its own gradient (tested against K separate steps). Causal models, no KL."""
    from emorl.lora_bank import lora_bank

    n_prompts = batches[0].prompt_ids.shape[0]
    k = batches[0].k
    if any(b.prompt_ids.shape[0] != n_prompts or b.k != k for b in batches):
        raise ValueError("joint update: every adapter needs the same number of prompts and k")
    per_mb = max(1, micro_batch_rows // (k * len(batches)))
    totals = [{"loss": 0.0, "pg_loss": 0.0} for _ in batches]
    for s in range(0, n_prompts, per_mb):
        e = min(n_prompts, s + per_mb)
        parts = [b.slice_prompts(s, e) for b in batches]
        width = max(p.completion_ids.shape[1] for p in parts)
        pw = max(p.prompt_ids.shape[1] for p in parts)  # prompts are left-padded: pad on the left
        joint = RolloutBatch(torch.cat([_pad_left(p.prompt_ids, pw, int(p.prompt_ids[0, 0])) for p in parts]),
                             torch.cat([_pad_left(p.prompt_mask, pw, 0) for p in parts]),
                             torch.cat([_pad_right(p.completion_ids, width, 0) for p in parts]),
                             torch.cat([_pad_right(p.completion_mask, width, 0) for p in parts]), k)
        with lora_bank(model, names):  # entered per micro-batch: the stacked A/B are rebuilt with autograd
            logp = causal_token_logprobs(model, joint, share_prompt=share_prompt, warp=warp)
        rows = (e - s) * k
        loss = logp.new_zeros(())
        for i, adv in enumerate(advantages):
            li, st = kscst_loss(logp[i * rows:(i + 1) * rows], joint.completion_mask[i * rows:(i + 1) * rows],
                                adv[s * k:e * k], n_prompts * k)
            loss = loss + li
            totals[i]["loss"] += float(li.detach())
            totals[i]["pg_loss"] += st["pg_loss"]
        loss.backward()
    return totals


def _pad_right(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _pad_left(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

"""Decode independent (prompt, weights, settings) pairs in ONE batched decode: the engine of ``emorl serve``.

:meth:`EnsembleModel.generate` decodes G weight points x B prompts with one set of sampling settings. A server
batches requests that each bring their own prompt, weights, temperature / top-k / top-p, length, stop strings and
seed. :func:`generate_pairs` decodes such a list of pairs through the same engine (the same prefill, lora bank,
mixing rule and :func:`~emorl.ensemble.chunk.decode_chunk`), with per-pair hooks (:class:`PairRows`):

* sampling warpers applied per row: rows are grouped by setting and each group goes through transformers' own
  ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (in ``generate``'s order), so a row
  is processed exactly as those warpers process it alone;
* greedy rows sharing a batch with sampled rows get a one-hot distribution at their argmax, which the inverse-CDF
  sampler maps back to that argmax whatever its uniform;
* each pair's uniforms are row ``row`` of ``uniforms(seed, row + 1, max_new_tokens)``: what ``generate`` draws for
  prompt ``row`` of a call with that seed and length. So a pair decodes token for token what ``generate`` decodes
  for its prompt, weights and settings alone (a pair with ``row = j`` equals reply j of ``generate([prompt] * n)``);
* each pair ends at its own ``max_new_tokens``, stop strings (transformers' ``StopStringCriteria``) or EOS, or when
  ``cancelled(i)`` turns true (at the next step); ``on_token`` / ``on_finish`` report tokens and finished pairs
  as they happen (streaming, early replies).

A batch has one mixing mode (``params`` rows carry merged weights, the other modes K adapter rows per prompt) and
either has the base stream or not (``anchored``: base-anchored points whose weights do not sum to 1 need it, as in
``generate``; a point that sums to 1 is decoded without it there, so it must be here too to match exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emorl.ensemble.chunk import DecodeSpec, decode_chunk
from emorl.ensemble.mixing import MODES
from emorl.ensemble.streams import Stream, cpu_row_padding
from emorl.lora_bank import BASE_SLOT, lora_bank
from emorl.sampling import uniforms
from emorl.utils import EmorlError


@dataclass
class PairSpec:
    """One reply to decode: model input text (chat template applied), weights over ``names``, settings."""

    text: str
    weights: Sequence[float]
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    row: int = 0  # reply index within its request: uniforms row (n > 1 choices share a seed)
    stop: tuple[str, ...] = ()


@dataclass
class PairResult:
    token_ids: list[int]  # generated ids, the ending token (EOS / stop) included
    text: str
    finish_reason: str  # stop (EOS or a stop string) | length | cancelled


class PairRows:
    """decode_chunk hooks for per-pair settings (see the module docstring)."""

    def __init__(self, ens: Any, pairs: Sequence[PairSpec], t_max: int, device: torch.device,
                 on_token: Callable[[int, int], None] | None, on_finish: Callable[[int, PairResult], None] | None,
                 cancelled: Callable[[int], bool] | None) -> None:
        self.ens = ens
        self.pairs = list(pairs)
        n = len(self.pairs)
        self.hist = torch.full((n, t_max), ens.pad, dtype=torch.long, device=device)
        self.max_new = torch.tensor([p.max_new_tokens for p in self.pairs], dtype=torch.long, device=device)
        self.sample = torch.tensor([p.do_sample for p in self.pairs], dtype=torch.bool, device=device)
        self.any_sample = bool(self.sample.any())
        self.on_token, self.on_finish, self.cancelled = on_token, on_finish, cancelled
        self.results: list[PairResult | None] = [None] * n
        self._stops: dict[tuple[str, ...], Any] = {}
        self.eos = set(ens.eos)

    def _groups(self, act: torch.Tensor, value: Callable[[PairSpec], Any]) -> dict[Any, torch.Tensor]:
        """Positions in ``act`` grouped by a pair setting (None: not applied)."""
        groups: dict[Any, list[int]] = {}
        for pos, i in enumerate(act.tolist()):
            v = value(self.pairs[i])
            if v is not None:
                groups.setdefault(v, []).append(pos)
        return {v: torch.tensor(p, dtype=torch.long, device=act.device) for v, p in groups.items()}

    def warp(self, act: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        sc = scores.clone()
        steps = (
            (lambda p: p.temperature if p.do_sample and p.temperature != 1.0 else None, TemperatureLogitsWarper),
            (lambda p: p.top_k if p.do_sample and p.top_k else None, TopKLogitsWarper),
            (lambda p: p.top_p if p.do_sample and p.top_p < 1.0 else None, TopPLogitsWarper),
        )
        for value, warper in steps:  # emorl.sampling.warpers' order: temperature, top-k, top-p
            for v, pos in self._groups(act, value).items():
                sc[pos] = warper(v)(ids[pos], sc[pos])
        if self.any_sample:  # greedy rows among sampled ones: one-hot at the argmax (choose() returns it)
            greedy = (~self.sample[act]).nonzero()[:, 0]
            if len(greedy):
                top = sc[greedy].argmax(-1)
                hot = torch.full_like(sc[greedy], float("-inf"))
                sc[greedy] = hot.scatter_(1, top[:, None], 0.0)
        return sc

    def _stop_criteria(self, stops: tuple[str, ...]) -> Any:
        if stops not in self._stops:
            from transformers import StopStringCriteria

            self._stops[stops] = StopStringCriteria(self.ens.tokenizer, list(stops))
        return self._stops[stops]

    def ended(self, t: int, act: torch.Tensor, tokens: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        self.hist[act, t] = tokens
        stopped = ended.clone()  # EOS
        for stops, pos in self._groups(act, lambda p: p.stop or None).items():
            stopped[pos] |= self._stop_criteria(stops)(self.hist[act[pos], : t + 1], None).to(ended.device)
        length = (t + 1) >= self.max_new[act]
        cancel = torch.zeros_like(ended)
        if self.cancelled is not None:
            cancel = torch.tensor([self.cancelled(i) for i in act.tolist()], dtype=torch.bool, device=ended.device)
        done = stopped | length | cancel
        act_l, tok_l = act.tolist(), tokens.tolist()
        if self.on_token is not None:
            for i, tok in zip(act_l, tok_l, strict=True):
                self.on_token(i, tok)
        for pos in done.nonzero()[:, 0].tolist():
            i = act_l[pos]
            ids = self.hist[i, : t + 1]
            reason = "cancelled" if bool(cancel[pos]) and not bool(stopped[pos]) else (
                "stop" if bool(stopped[pos]) else "length")
            res = PairResult(ids.tolist(), self.ens._text(ids, list(self.pairs[i].stop)), reason)
            self.results[i] = res
            if self.on_finish is not None:
                self.on_finish(i, res)
        return done


def generate_pairs(ens: Any, names: Sequence[str], mode: str, pairs: Sequence[PairSpec], *, anchored: bool = False,
                   on_token: Callable[[int, int], None] | None = None,
                   on_finish: Callable[[int, PairResult], None] | None = None,
                   cancelled: Callable[[int], bool] | None = None,
                   max_prompt_tokens: int | None = None) -> list[PairResult]:
    """Decode ``pairs`` in one batch of mode ``mode``; ``names``: the adapters (loaded on ``ens.model``) that each
    pair's ``weights`` refer to, in order (already under their weight rule: convex points rescaled to sum 1).
    Adapters no pair uses are left out of the batch (as ``generate`` does). ``anchored``: add the base stream, mixed
    as (1 - sum w) h_0 + sum w_k h_k (a point w = 0 is the base model); not for ``params``. ``max_prompt_tokens``:
    the prompt limit (default: the model config's, the training setting)."""
    from emorl.data import encode_prompts

    if mode not in MODES:
        raise EmorlError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if not pairs:
        return []
    w = np.asarray([list(p.weights) for p in pairs], dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != len(names):
        raise EmorlError(f"generate_pairs: every pair needs {len(names)} weights ({', '.join(names)})")
    if not np.isfinite(w).all() or (w < 0).any() or (not anchored and not (w > 0).any(axis=1).all()):
        raise EmorlError("generate_pairs: weights must be finite, >= 0, with a positive weight in every pair "
                         "unless anchored")
    if anchored and mode == "params":
        raise EmorlError("generate_pairs: params mixing has no base stream (anchored params is W0 + sum w dW)")
    for p in pairs:
        if p.max_new_tokens < 1 or (p.do_sample and not (p.temperature > 0 and p.top_k >= 0 and 0 < p.top_p <= 1)):
            raise EmorlError(f"generate_pairs: bad settings {p}")
    ens.verify_head()
    dev = ens.device
    used = [i for i in range(len(names)) if (w[:, i] > 0).any()]
    bank_names = [names[i] for i in used] + ([BASE_SLOT] if anchored else [])
    w_used = torch.tensor(w[:, used], dtype=torch.float32, device=dev)
    streams = len(bank_names)
    texts = list(dict.fromkeys(p.text for p in pairs))  # pairs of one prompt share its prefill rows
    b_idx = torch.tensor([texts.index(p.text) for p in pairs], dtype=torch.long, device=dev)
    limit = max_prompt_tokens or ens.base.config.max_prompt_tokens
    enc = encode_prompts(ens.tokenizer, texts, limit, ens.base.is_seq2seq, dev)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t_max = max(p.max_new_tokens for p in pairs)
    u = None
    if any(p.do_sample for p in pairs):
        u = torch.full((len(pairs), t_max), 0.5, dtype=torch.float32)
        for i, p in enumerate(pairs):
            if p.do_sample:
                u[i, : p.max_new_tokens] = uniforms(int(p.seed), p.row + 1, p.max_new_tokens)[p.row]
        u = u.to(dev)
    rows = PairRows(ens, pairs, t_max, dev, on_token, on_finish, cancelled)
    spec = DecodeSpec(mode, t_max, 0, u is not None, 1.0, 0, 1.0, ens.eos, ens.pad, anchored=anchored, rows=rows)
    cap = ((1 if ens.base.is_seq2seq else ids.shape[1]) + t_max) if ens.preallocate else None
    params = mode == "params"
    with torch.inference_mode(), cpu_row_padding(ens.stream.layers), \
            lora_bank(ens.model, bank_names, w_used[:1] if params else None) as bank:
        if params:  # one stream per pair with its merged weights (no prefill shared across weights)
            bank.set_weights(w_used)
            h0, state = ens.stream.prefill(ids[b_idx], mask[b_idx])
            group0 = torch.arange(len(pairs), device=dev)
            if cap is not None:
                state = Stream.select(state, group0, cap)
        else:  # one row per stream (adapters, + base) per distinct prompt, prefilled once
            h0, st = ens.stream.prefill(ids, mask, streams, ens.trunk(bank_names))
            state = Stream.select(st, torch.arange(ids.shape[0], device=dev), cap)
            group0 = b_idx
        decode_chunk(ens.stream, ens.head, bank, spec, h0, state, group0, w_used, streams, u)
    missing = [i for i, r in enumerate(rows.results) if r is None]
    if missing:  # decode_chunk ends every pair through the hook; this would be a bug
        raise EmorlError(f"generate_pairs: pairs {missing} did not finish")
    return [r for r in rows.results if r is not None]

"""The backbone as the ensemble runs it: :class:`Stream` (prefill and one-token steps of a causal or seq2seq
model with a KV cache, hidden states out) and :class:`Head` (the shared LM head with the architecture's output
transform, applied to mixed hidden states)."""

from __future__ import annotations

from typing import Any

import torch

from emorl.ensemble.kv import fork_cache
from emorl.lora_bank import pad_rows
from emorl.models import cache_kwarg, output_cache, position_ids


class Head:
    """The shared LM head with the architecture's output transform: T5's d_model^-0.5 before a tied head,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's final soft-capping. :meth:`verify` checks it
    against the model's own forward, so an unknown transform is caught instead of silently mis-mixing."""

    def __init__(self, lm: Any, is_seq2seq: bool) -> None:
        cfg = lm.config
        self.lm_head = lm.get_output_embeddings()
        self.pre_scale = 1.0
        if is_seq2seq and getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
            self.pre_scale = float(getattr(cfg, "d_model", cfg.hidden_size)) ** -0.5
        self.post_scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        if getattr(cfg, "logits_scaling", None):
            self.post_scale /= float(cfg.logits_scaling)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        h = h.to(w.dtype)
        if self.pre_scale != 1.0:
            h = h * self.pre_scale
        n = h.shape[0]
        z = self.lm_head(pad_rows(h, 0))[:n].float()  # a lone row: the kernel of a batch (lora_bank.MIN_GEMM_ROWS)
        if self.post_scale != 1.0:
            z = z * self.post_scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


class Stream:
    """Prefill and one-token steps of a causal or seq2seq backbone with a KV cache; hidden states out."""

    def __init__(self, lm: Any, is_seq2seq: bool, decoder_start: int | None) -> None:
        self.lm = lm
        self.is_seq2seq = is_seq2seq
        self.decoder = lm.get_decoder()
        self.encoder = lm.get_encoder() if is_seq2seq else None
        self.kw = cache_kwarg(self.decoder)
        self.decoder_start = decoder_start

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.is_seq2seq:
            from transformers import DynamicCache, EncoderDecoderCache

            enc = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            st: dict[str, Any] = {"enc": enc, "mask": mask, "cache": cache}
            start = torch.full((ids.shape[0],), self.decoder_start, dtype=torch.long, device=ids.device)
            return self.step(start, st), st
        pos = position_ids(mask)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        st = {"cache": output_cache(out), "mask": mask, "pos": pos[:, -1] + 1}
        return out.last_hidden_state[:, -1], st

    def step(self, tokens: torch.Tensor, st: dict[str, Any]) -> torch.Tensor:
        if self.is_seq2seq:
            out = self.decoder(input_ids=tokens[:, None], encoder_hidden_states=st["enc"],
                               encoder_attention_mask=st["mask"], use_cache=True, **{self.kw: st["cache"]})
            st["cache"] = output_cache(out)
            return out.last_hidden_state[:, -1]
        st["mask"] = torch.cat([st["mask"], st["mask"].new_ones(st["mask"].shape[0], 1)], dim=1)
        out = self.decoder(input_ids=tokens[:, None], attention_mask=st["mask"], position_ids=st["pos"][:, None],
                           use_cache=True, **{self.kw: st["cache"]})
        st["cache"] = output_cache(out)
        st["pos"] = st["pos"] + 1
        return out.last_hidden_state[:, -1]

    @staticmethod
    def select(st: dict[str, Any], idx: torch.Tensor, capacity: int | None = None) -> dict[str, Any]:
        """A new state with rows ``idx`` (the old state stays valid: used to fork one prefill many times);
        ``capacity``: preallocate the self-attention cache to that many positions."""
        out = {k: (v.index_select(0, idx) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        out["cache"] = fork_cache(st["cache"], idx, capacity)
        return out

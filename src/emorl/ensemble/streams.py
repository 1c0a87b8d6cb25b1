"""The backbone as the ensemble runs it: :class:`Stream` (prefill and one-token steps of a causal or seq2seq
model with a KV cache, hidden states out) and :class:`Head` (the shared LM head with the architecture's output
transform, applied to mixed hidden states)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

from emorl.ensemble.kv import fork_cache
from emorl.lora_bank import MIN_GEMM_ROWS, pad_rows
from emorl.models import cache_kwarg, output_cache, position_ids
from emorl.utils import EmorlError


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


def _padded_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` with 1-3 rows padded to the kernel of a batch (see lora_bank.MIN_GEMM_ROWS)."""
    n = x.numel() // x.shape[-1]
    if 0 < n < MIN_GEMM_ROWS:
        y = torch.nn.functional.linear(pad_rows(x.reshape(n, x.shape[-1]), 0), self.weight, self.bias)
        return y[:n].reshape(*x.shape[:-1], -1)
    return torch.nn.functional.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def cpu_row_padding(layers: Any) -> Iterator[None]:
    """On the CPU, make the plain ``nn.Linear`` layers of ``layers`` (those no LoRA layer wraps: the LoRA bank pads
    those) take the kernel of a batch for 1-3 rows, so a lone request's trunk computes what it computes in a batch.
    A no-op elsewhere (a CPU kernel workaround)."""
    from peft.tuners.lora import LoraLayer

    mods = list(layers.modules())
    first = next(layers.parameters(), None)
    if first is None or first.device.type != "cpu":
        yield
        return
    inside_lora = {id(sub) for m in mods if isinstance(m, LoraLayer) for sub in m.modules()}
    plain = [m for m in mods if type(m) is torch.nn.Linear and id(m) not in inside_lora and "forward" not in m.__dict__]
    for m in plain:
        m.forward = types.MethodType(_padded_linear_forward, m)
    try:
        yield
    finally:
        for m in plain:
            del m.forward


class FanOut:
    """Forward pre-hooks on the decoder layers from the first adapted one up: the trunk below ran on one row per
    group (m rows); there every batch tensor argument (hidden states, masks, rotary tables, T5's position biases
    and encoder states) becomes ``streams`` copies, stream-major (row j*m + g is stream j of group g: the LoRA bank's
    layout). Arguments already streams*m rows (set by a layer above the first) pass unchanged. With ``index`` (the
    serving runner's rows: row r is a copy of group ``index[r]``, any number of rows per group) the rows are
    ``x[index]`` instead, and above the first layer only the tensors expanded at the first are expanded again."""

    def __init__(self, layers: Any, streams: int, m: int, index: torch.Tensor | None = None) -> None:
        self.layers, self.streams, self.m = list(layers), streams, m
        self.index = index
        self.handles: list[Any] = []
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one expansion per tensor per forward

    def _expand(self, x: Any, first: bool) -> Any:
        if isinstance(x, tuple):
            return tuple(self._expand(v, first) for v in x)
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] != self.m:
            return x
        hit = self.memo.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if self.index is not None and not first:  # above the first layer only the tensors expanded there (the
            return x  # shared masks and rotary tables): a layer's own output may have m rows by coincidence
        out = x.repeat(self.streams, *([1] * (x.ndim - 1))) if self.index is None else x.index_select(0, self.index)
        self.memo[id(x)] = (x, out)
        return out

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        first = module is self.layers[0]
        return tuple(self._expand(a, first) for a in args), {key: self._expand(v, first) for key, v in kwargs.items()}

    def __enter__(self) -> FanOut:
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.memo = [], {}


class Stream:
    """Prefill and one-token steps of a causal or seq2seq backbone with a KV cache; hidden states out.

    A state holds ``streams`` streams (the adapters, + the base) of m row groups. Without a shared trunk every row
    of every stream is computed (streams*m rows, stream-major). With ``trunk`` = L > 0 (no adapter below decoder
    layer L) the inputs, the encoder and layers 0..L-1 run on the m groups once and :class:`FanOut` expands them into
    the streams at layer L; the cache of layers below L holds m rows, the others streams*m. Hidden states out are
    always streams*m rows, stream-major. Tokens in are one per group."""

    def __init__(self, lm: Any, is_seq2seq: bool, decoder_start: int | None) -> None:
        from emorl.layer_spec import layer_stack

        self.lm = lm
        self.is_seq2seq = is_seq2seq
        self.decoder = lm.get_decoder()
        self.encoder = lm.get_encoder() if is_seq2seq else None
        self.kw = cache_kwarg(self.decoder)
        self.decoder_start = decoder_start
        try:
            self.layers = layer_stack(lm)[1]
        except EmorlError:  # no list of decoder layers found: no shared trunk (every stream runs every layer)
            self.layers = torch.nn.ModuleList()

    def _fan(self, st: dict[str, Any], m: int) -> Any:
        if not st["trunk"]:
            return contextlib.nullcontext()
        return FanOut(self.layers[st["trunk"]:], st["streams"], m)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, streams: int = 1, trunk: int = 0
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the prompts ``ids`` (m rows, one per group) through ``streams`` streams; ``trunk``: layers shared
        below."""
        trunk = trunk if streams > 1 else 0
        if not trunk:  # every stream computes every layer
            ids, mask = ids.repeat(streams, 1), mask.repeat(streams, 1)
        if self.is_seq2seq:
            from transformers import DynamicCache, EncoderDecoderCache

            enc = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            st: dict[str, Any] = {"enc": enc, "mask": mask, "cache": cache, "streams": streams, "trunk": trunk}
            m = ids.shape[0] if trunk else ids.shape[0] // streams
            start = torch.full((m,), self.decoder_start, dtype=torch.long, device=ids.device)
            return self.step(start, st), st
        pos = position_ids(mask)
        with self._fan({"streams": streams, "trunk": trunk}, ids.shape[0]):
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        st = {"cache": output_cache(out), "mask": mask, "pos": pos[:, -1] + 1, "streams": streams, "trunk": trunk}
        return out.last_hidden_state[:, -1], st

    def step(self, tokens: torch.Tensor, st: dict[str, Any]) -> torch.Tensor:
        """One token per group (m,) into every stream; the streams*m rows' last hidden states out."""
        m = tokens.shape[0]
        if not st["trunk"]:
            tokens = tokens.repeat(st["streams"])
        with self._fan(st, m):
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
    def select(st: dict[str, Any], groups: torch.Tensor, capacity: int | None = None) -> dict[str, Any]:
        """A new state holding row groups ``groups`` (indices into the m groups; the old state stays valid: used
        to fork one prefill many times); ``capacity``: preallocate the self-attention cache to that many
        positions."""
        streams, trunk = st["streams"], st["trunk"]
        m = st["mask"].shape[0] if trunk else st["mask"].shape[0] // streams
        rows = (groups[None, :] + m * torch.arange(streams, device=groups.device)[:, None]).reshape(-1)
        per_group = groups if trunk else rows  # the state's tensors: one row per group (trunk) or per stream row
        out = {key: (v.index_select(0, per_group) if isinstance(v, torch.Tensor) else v) for key, v in st.items()}
        out["cache"] = fork_cache(st["cache"], rows, capacity, (trunk, groups))
        return out

"""The cached, batched decoding engine behind :class:`~emorl.ensemble.EnsembleModel`.

Rows of a forward are laid out adapter-major: for a chunk of n (weight point, prompt) pairs, rows
``[k*n:(k+1)*n]`` carry adapter k (the :func:`~emorl.lora_bank` layout), so the K adapters of a step run
as one forward over the shared base. The prompt prefill runs once per adapter on the B prompts; its KV cache is
then forked (row-indexed) for every weight point. Finished rows are dropped from the batch (their cache rows too)
once they are a quarter of it, so early EOS saves work.

Mixing rules, per step, from the K adapters' last hidden states h_k (after the final norm), the base stream's h_0
(adapters off: one more row group of the same forward, the LoRA bank's zero slot) and weights w:

* ``hidden``  (EMORL): logits = head(h_0 + sum_k w_k (h_k - h_0))   — head = the shared LM head with its scaling
* ``logits``  (MOD):   scores = ls_0 + sum_k w_k (ls_k - ls_0),  ls = log_softmax(head(h))
* ``probs``:           scores = log sum_k w_k softmax(head(h_k))    (a mixture: always convex, scale invariant)
* ``params``  (model soups): one stream whose LoRA layers apply W0 + sum_k w_k ΔW_k (the bank's weighted mode)

The one weight rule (:func:`weight_rule`): with ``anchor="base"`` the weights are used as given, each adapter's
shift of the base at strength w_k (w = 0 is the base itself; params is then task arithmetic); with
``anchor="none"`` every point is rescaled to sum 1 (the paper's convex hidden mix, the parameter *average*), so
only its direction matters. The two agree wherever sum(w) = 1, and the base stream is only decoded when some point
needs it. The mixed form is computed as (1 - sum w) x_0 + sum_k w_k x_k, so a one-hot point is exactly its
adapter and w = 0 exactly the base.

Sampling draws one uniform per (point, prompt, step) from a generator seeded by (seed, weight point), so a
point's samples do not depend on which other points or how many rows share its batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from emorl.lora_bank import pad_rows
from emorl.models import cache_kwarg, output_cache, position_ids
from emorl.sampling import choose as _choose
from emorl.sampling import warpers
from emorl.utils import EmorlError

MODES = ("hidden", "logits", "probs", "params")
ANCHORS = ("base", "none")


def weight_rule(mode: str, anchor: str) -> str:
    """``"anchored"`` (weights used as given, relative to the base) or ``"convex"`` (each point rescaled to sum 1).

    ``probs`` is a mixture of distributions, invariant to the weights' scale: always convex."""
    if anchor not in ANCHORS:
        raise EmorlError(f"anchor={anchor!r}: choose 'base' (h0 + sum w_k (h_k - h0)) or 'none' (the convex mix)")
    if mode not in MODES:
        raise EmorlError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    return "convex" if mode == "probs" or anchor == "none" else "anchored"


def is_scale_invariant(mode: str, anchor: str) -> bool:
    """Whether w and c*w (c > 0) decode the same replies, greedy or sampled: true exactly for convex points."""
    return weight_rule(mode, anchor) == "convex"


# ------------------------------------------------------------------------------------------------ weights

def check_weights(weights: Any, k: int, normalize: bool = False, names: list[str] | None = None,
                  allow_zero: bool = False) -> tuple[np.ndarray, bool]:
    """Validate mixing weights before any work: a K-vector or a G×K matrix, finite, >= 0, no all-zero point
    (unless ``allow_zero``: an anchored point w = 0 is the base model).

    Returns (G×K float64 array, whether a single vector was given). ``normalize`` rescales each point to sum 1
    (the convex rule)."""
    label = f" ({', '.join(names)})" if names else ""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EmorlError(f"weights: expected numbers, one per adapter{label}; got {weights!r}") from e
    single = w.ndim == 1
    if single:
        w = w[None, :]
    if w.ndim != 2 or w.shape[0] == 0:
        raise EmorlError(f"weights: expected a vector of {k} or a G×{k} matrix, got shape {np.shape(weights)}")
    if w.shape[1] != k:
        raise EmorlError(f"weights: each point needs {k} weights, one per adapter{label}; got {w.shape[1]}")
    for g, row in enumerate(w):
        where = "weights" if single else f"weights[{g}]"
        if not np.isfinite(row).all():
            raise EmorlError(f"{where} = {row.tolist()}: NaN or infinite weight")
        if (row < 0).any():
            raise EmorlError(f"{where} = {row.tolist()}: weights must be >= 0")
        if not (row > 0).any() and not allow_zero:
            raise EmorlError(f"{where} is all zero: that point is degenerate (no adapter contributes); give at "
                             f"least one positive weight")
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    return w, single


# ------------------------------------------------------------------------------------------------ result

@dataclass
class GenerationResult:
    """Decoded replies for G weight points × B prompts.

    ``texts`` / ``token_ids`` / ``lengths`` drop the point axis when ``weights`` was one vector. Token ids are
    right-padded with the pad id after a row's end (EOS is kept; a matched stop string's tokens are kept in the
    ids but cut from the text)."""

    prompts: list[str]
    names: list[str]
    mode: str
    weights: np.ndarray  # (G, K) as used (after normalisation)
    all_texts: list[list[str]]  # G × B
    all_token_ids: torch.Tensor  # (G, B, T) long, pad after a row's end
    all_lengths: torch.Tensor  # (G, B) generated tokens per row, EOS included
    single: bool = False
    scores: torch.Tensor | None = None  # (G, B, T, V) mixed scores before sampling warpers, if requested
    stats: dict[str, Any] = field(default_factory=dict)
    anchor: str = "base"  # the weight rule applied: "base" (anchored) or "none" (convex; weights as rescaled)

    @property
    def texts(self) -> list[str] | list[list[str]]:
        return self.all_texts[0] if self.single else self.all_texts

    @property
    def token_ids(self) -> torch.Tensor:
        return self.all_token_ids[0] if self.single else self.all_token_ids

    @property
    def lengths(self) -> torch.Tensor:
        return self.all_lengths[0] if self.single else self.all_lengths

    def records(self) -> list[dict[str, Any]]:
        """One dict per (point, prompt): prompt, weights, mode, response — the rows of ``emorl generate``."""
        return [{"prompt": p, "weights": dict(zip(self.names, map(float, self.weights[g]), strict=True)),
                 "mode": self.mode, "anchor": self.anchor, "reply": self.all_texts[g][b]}
                for g in range(len(self.all_texts)) for b, p in enumerate(self.prompts)]


# ------------------------------------------------------------------------------------------------ model parts

def _buffered_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer over a buffer preallocated to the final length: each step writes its key/value in place
        and attention reads a view, instead of ``torch.cat`` copying the whole cache every step."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            super().__init__()
            self._k = self._alloc(keys, capacity)
            self._v = self._alloc(values, capacity)
            self._n = keys.shape[-2]
            self.device = keys.device
            self.is_initialized = True
            self._views()

        @staticmethod
        def _alloc(t: torch.Tensor, capacity: int) -> torch.Tensor:
            buf = t.new_empty(*t.shape[:-2], max(capacity, t.shape[-2]), t.shape[-1])
            buf[..., : t.shape[-2], :] = t
            return buf

        def _views(self) -> None:
            self.keys = self._k[..., : self._n, :]
            self.values = self._v[..., : self._n, :]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            m = key_states.shape[-2]
            if self._n + m > self._k.shape[-2]:  # out of room: grow (not expected within max_new_tokens)
                self._k = self._alloc(self.keys, 2 * (self._n + m))
                self._v = self._alloc(self.values, 2 * (self._n + m))
            self._k[..., self._n:self._n + m, :] = key_states
            self._v[..., self._n:self._n + m, :] = value_states
            self._n += m
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            self._n -= abs(tokens_to_remove)
            self._views()

    return BufferedLayer


_BUFFERED: type | None = None


def fork_cache(cache: Any, idx: torch.Tensor, capacity: int | None = None) -> Any:
    """A new cache holding rows ``idx`` of ``cache`` (which is left untouched). With ``capacity``, plain
    ``DynamicLayer`` layers become preallocated buffers of that many positions (no per-step copy)."""
    global _BUFFERED
    from transformers import EncoderDecoderCache
    from transformers.cache_utils import DynamicLayer

    if isinstance(cache, EncoderDecoderCache):
        return EncoderDecoderCache(fork_cache(cache.self_attention_cache, idx, capacity),
                                   fork_cache(cache.cross_attention_cache, idx))
    new = copy.copy(cache)
    if capacity is not None:
        _BUFFERED = _BUFFERED or _buffered_layer_class()
        layers = []
        for layer in cache.layers:
            if type(layer) in (DynamicLayer, _BUFFERED) and layer.is_initialized and layer.keys.numel():
                layers.append(_BUFFERED(layer.keys[idx], layer.values[idx], capacity))
            else:
                layer = copy.copy(layer)
                layer.batch_select_indices(idx)
                layers.append(layer)
        new.layers = layers
        return new
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(idx)
    return new


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


def cache_bytes_per_row_token(cache: Any, rows: int) -> float:
    """Measured KV-cache bytes per row and cached position (any architecture), for the memory budget."""
    from transformers import EncoderDecoderCache

    caches = [cache.self_attention_cache, cache.cross_attention_cache] if isinstance(cache, EncoderDecoderCache) \
        else [cache]
    total, length = 0, 1
    for c in caches:
        for layer in c.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.ndim >= 3:
                    total += t.numel() * t.element_size()
                    length = max(length, t.shape[-2])
    return total / max(1, rows) / length


# ------------------------------------------------------------------------------------------------ decoding

@dataclass
class DecodeSpec:
    """Everything a chunk decode needs besides the model state."""

    mode: str
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: list[int]
    pad: int
    stop_criteria: Any = None  # transformers StopStringCriteria or None
    output_scores: bool = False
    anchored: bool = False  # the last row group is the base stream (base-anchored mixing)
    # per-pair settings (emorl serve, :mod:`emorl.ensemble.pairs`): an object with ``warp(act, ids, scores)`` used
    # instead of :meth:`processors`, and ``ended(t, act, tokens, ended)`` returning which pairs end at step t
    rows: Any = None

    def processors(self, device: torch.device) -> Any:
        """transformers' logits processors/warpers for this spec (the ones ``generate`` would build)."""
        from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

        procs = LogitsProcessorList()
        if self.min_new_tokens > 0 and self.eos:
            procs.append(MinNewTokensLengthLogitsProcessor(0, self.min_new_tokens, self.eos, device=str(device)))
        if self.do_sample:
            procs.extend(warpers(self.temperature, self.top_k, self.top_p))
        return procs


def mix_scores(mode: str, h: torch.Tensor, k: int, rows: torch.Tensor, w: torch.Tensor, head: Head,
               anchored: bool = False) -> torch.Tensor:
    """Next-token scores (a, V) of ``a`` pairs. ``h`` (k*m, H): hidden states of m row groups, stream-major (k
    streams: the adapters, then the base stream if ``anchored``); ``rows`` (a,): each pair's group; ``w`` (a, K):
    each pair's adapter weights (unused for ``params``, where k = 1). Anchored: (1 - sum w) x_0 + sum w_k x_k."""
    hk = h.view(k, -1, h.shape[-1])
    if mode == "params":
        return head(hk[0, rows])
    wt = w.t().to(torch.float32)[:, :, None]  # (K, a, 1)
    if anchored:
        wt = torch.cat([wt, 1.0 - wt.sum(0, keepdim=True)])  # the base stream's weight
    if mode == "hidden":
        return head((hk[:, rows].to(torch.float32) * wt).sum(0))
    ls = torch.log_softmax(head(h), dim=-1).view(k, hk.shape[1], -1)[:, rows]  # head once per group, then gather
    if mode == "logits":
        return (ls * wt).sum(0)
    return torch.logsumexp(ls + torch.log(wt), dim=0)  # probs: log sum_k w_k p_k


def decode_chunk(stream: Stream, head: Head, bank: Any, spec: DecodeSpec, h0: torch.Tensor, state: dict[str, Any],
                 group0: torch.Tensor, w_pairs: torch.Tensor, k: int, u: torch.Tensor | None, progress: Any = None,
                 stats: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode n (point, prompt) pairs from a state of m row groups (k*m rows, adapter-major; k = 1 for params).

    Pairs whose prompt and generated prefix are identical share one group — one set of K backbone rows — since
    their hidden states are identical whatever their weights; a group splits when its pairs choose different
    tokens. So weight points that agree on a prefix pay for it once (exact: the same computation, done once).
    ``k``: streams per group (the adapters, plus the base stream when ``spec.anchored``; 1 for params).
    ``group0`` (n,): each pair's initial group (its prompt's row of the prefill); ``w_pairs`` (n, K);
    ``u`` (n, T) uniforms for sampling or None for greedy. Returns token ids (n, T) padded, lengths (n,), and
    the per-step mixed scores (n, T, V) if ``spec.output_scores``."""
    n, t_max = w_pairs.shape[0], spec.max_new_tokens
    dev = h0.device
    params = spec.mode == "params"
    kk = 1 if params else k
    out = torch.full((n, t_max), spec.pad, dtype=torch.long, device=dev)
    lengths = torch.full((n,), t_max, dtype=torch.long, device=dev)
    scores_out = None
    procs = spec.processors(dev) if spec.rows is None else None
    eos = torch.tensor(spec.eos, dtype=torch.long, device=dev)
    grp = group0.clone()
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    m = h0.shape[0] // kk
    w_rows = w_pairs[grp] if params else None  # params: the bank's weights, one row per group (= pair)
    h = h0
    rows_done = 0
    for t in range(t_max):
        act = alive.nonzero()[:, 0]
        g_act = grp[act]
        sc = mix_scores(spec.mode, h, kk, g_act, w_pairs[act], head, spec.anchored)
        if spec.output_scores:
            if scores_out is None:
                scores_out = torch.zeros(n, t_max, sc.shape[-1], dtype=torch.float32, device=dev)
            scores_out[act, t] = sc
        sc = procs(out[act, :t], sc) if procs is not None else spec.rows.warp(act, out[act, :t], sc)
        nxt = _choose(sc, None if u is None else u[act, t])
        out[act, t] = nxt
        ended = torch.isin(nxt, eos)
        if spec.stop_criteria is not None:
            ended |= spec.stop_criteria(out[act, : t + 1], None).to(dev)
        if spec.rows is not None:
            ended = spec.rows.ended(t, act, nxt, ended)
        lengths[act[ended]] = t + 1
        alive[act[ended]] = False
        rows_done += kk * m
        if progress is not None:
            progress.update(1)
        if t == t_max - 1 or not bool(alive.any()):
            if progress is not None:
                progress.update(t_max - 1 - t)
            break
        cont = ~ended
        act, g_act, nxt = act[cont], g_act[cont], nxt[cont]
        # regroup: pairs of one group that chose the same token stay together (params: one group per pair)
        if params:
            parent, tok, inv = g_act, nxt, torch.arange(len(act), device=dev)
        else:
            key = g_act * sc.shape[-1] + nxt
            uniq, inv = torch.unique(key, return_inverse=True)
            parent, tok = uniq // sc.shape[-1], uniq % sc.shape[-1]
        split = len(parent) > int(torch.unique(parent).numel())
        if not split and (m - len(parent)) * 4 < m:  # only a few groups died: keep the layout, feed them pads
            feed = torch.full((m,), spec.pad, dtype=torch.long, device=dev)
            feed[parent] = tok
            grp[act] = g_act
        else:  # new layout: gather the surviving / splitting groups' cache rows
            sel = (parent[None, :] + m * torch.arange(kk, device=dev)[:, None]).reshape(-1)
            state = stream.select(state, sel)
            if stats is not None:
                stats["regroups"] = stats.get("regroups", 0) + 1
            grp[act] = inv
            m, feed = len(parent), tok
            if params:
                w_rows = w_rows[parent]
                bank.set_weights(w_rows)
        h = stream.step(feed.repeat(kk), state)
    if stats is not None:
        stats["row_steps"] = stats.get("row_steps", 0) + rows_done
        stats["row_steps_unshared"] = stats.get("row_steps_unshared", 0) + int(kk * lengths.sum())
    return out, lengths, scores_out


def derive_chunking(budget_bytes: float, per_row_token: float, length: int, vocab: int, k: int, mode: str,
                    max_rows: int | None) -> int:
    """How many backbone rows fit the memory budget: KV cache (+ its per-step copy) and the step's logits."""
    per_row = 2.5 * per_row_token * length + 4.0 * vocab * (3 if mode in ("logits", "probs") else 1.0 / k)
    rows = max(1, int(budget_bytes // max(per_row, 1.0)))
    if max_rows is not None:
        rows = min(rows, max_rows)
    return rows


def default_budget(device: torch.device) -> float:
    """Memory for one decoding chunk: half the free GPU memory, or 4 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    return 4.0 * 2**30


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))

"""The running batch of the step scheduler: TGI's first-generation ``CausalLMBatch`` over the ensemble's rows.

A reply in flight is a :class:`Seq`. It owns one backbone row per *stream*: each adapter it mixes (one-hot LoRA
coefficients), the base stream for base-anchored mixes (coefficients 0), or one row with its weights as LoRA
coefficients (``params``: W0 + sum_k w_k ΔW_k; a one-policy model or the base: one row). Rows of every mode sit in
one :class:`RunningBatch` — a dataclass of tensors (left-padded attention mask, positions, per-layer KV, per-row
LoRA coefficients, last hidden states) with :meth:`~RunningBatch.filter` (retire finished or cancelled replies at
the next step) and :meth:`~RunningBatch.concatenate` (join a freshly prefilled batch, KV left-padded to a common
length). Why not paged KV: on a CPU with tens of rows the copy on join/retire is small next to the forward, and a
padded cache keeps the model's own attention code (``research/serving-anchors.md``: TGI's 2023 design).

With a shared trunk (``trunk`` = L > 0: no loaded adapter has a LoRA layer below decoder layer L, issue 24) a
reply's rows are identical below layer L, so the cache of those layers holds ONE row per reply (its *group*, the
reply's index in ``seqs``) and the layers above one per row; every method here indexes each layer by its own rows.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from emorl.ensemble.pairs import PairSpec

PAD_ALIGN = 16  # left padding is trimmed in multiples of this (emorl.prompts.PAD_MULTIPLE: attention alignment)
KV_BLOCK = 16  # positions a running cache layer grows by at once (room beyond the KV budget: at most this per row)


class GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` whose keys and values are views of buffers with room for :data:`KV_BLOCK`
    more positions: a decode step writes its position instead of copying the whole cache (``torch.cat``: measured
    14% of a 64-row decode step, bench/RESULTS.md "serve_step"). Keys set from outside (filter, select) are copied
    into a new buffer at the next update."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def _owns_keys(self) -> bool:
        k, kb = self.keys, self._kbuf
        return (kb is not None and k is not None and k.numel() > 0 and k.data_ptr() == kb.data_ptr()
                and k.shape[:2] == kb.shape[:2] and k.stride() == kb.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        if not self._owns_keys() or self._kbuf is None or self._kbuf.shape[-2] < n + t:
            shape = (*key_states.shape[:-2], n + t + KV_BLOCK, key_states.shape[-1])
            kb, vb = key_states.new_empty(shape), value_states.new_empty(shape)
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._kbuf, self._vbuf = kb, vb
        assert self._vbuf is not None
        self._kbuf[:, :, n:n + t].copy_(key_states)
        self._vbuf[:, :, n:n + t].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, :n + t], self._vbuf[:, :, :n + t]
        return self.keys, self.values

    def adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
        """Take buffers the caller filled (positions [0, n), room after): the next update writes in place."""
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]
        self.device = kbuf.device
        self.is_initialized = True

    def release(self) -> None:
        """Drop this layer's tensors (its batch is being replaced): a join or retire then holds one layer of the old
        cache at a time beside the new one, not all of it (the flood's peak memory, bench/RESULTS.md)."""
        self.keys = self.values = self._kbuf = self._vbuf = None


def _room_like(t: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """An uninitialised (rows, heads, length + KV_BLOCK, head_dim) buffer like ``t``: a joined or filtered layer's
    keys or values with a block of room, so the steps after it write in place. The caller fills positions
    [0, length) (left padding with zeros: a masked position must not hold NaN); the room is written before it is
    read."""
    return t.new_empty((rows, t.shape[1], length + KV_BLOCK, t.shape[3]))


class RunningCache(DynamicCache):
    """The running batch's KV cache: a ``DynamicCache`` of :class:`GrowingLayer` s (the model's own attention code
    reads it as any dynamic cache)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


@dataclass
class Seq:
    """One reply being decoded: its request's settings (``spec``), its streams and its sampling state."""

    job: Any  # the emorl.serve.engine.Job it answers
    choice: int  # its index among the job's choices (n > 1)
    spec: PairSpec
    mode: str  # hidden | logits | probs | params
    coef: torch.Tensor  # (S, K_all) LoRA coefficients of its S rows
    mix: torch.Tensor  # (S,) float32 mixing weights of its rows' outputs (1.0 for a one-row reply)
    u: torch.Tensor | None  # (max_new_tokens,) uniforms when sampled
    prompt_width: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # stop | length | cancelled

    @property
    def rows(self) -> int:
        return int(self.coef.shape[0])

    def worst_len(self, now: int) -> int:
        """KV positions this reply may still need from a batch of length ``now``: its remaining tokens on top, and
        the room a :class:`GrowingLayer` may hold beyond them."""
        return now + self.spec.max_new_tokens - len(self.tokens) + KV_BLOCK


def trunk_layout(seqs: list[Seq], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared trunk's view of seq-contiguous rows: each reply's first row (its mask and position stand for the
    reply's trunk row) and, for every row, its reply's index (the trunk row it fans out from)."""
    rows = torch.tensor([s.rows for s in seqs], dtype=torch.long, device=device)
    return rows.cumsum(0) - rows, torch.repeat_interleave(torch.arange(len(seqs), device=device), rows)


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _pad_left(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class RunningBatch:
    """Rows of several replies, seq-contiguous (reply i owns ``seqs[i].rows`` consecutive rows)."""

    seqs: list[Seq]
    cache: Any  # transformers DynamicCache: keys/values (rows, heads, L, d) per layer
    mask: torch.Tensor  # (rows, L) long, left-padded
    pos: torch.Tensor  # (rows,) position of the next token
    coef: torch.Tensor  # (rows, K_all) LoRA coefficients
    h: torch.Tensor  # (rows, H) last hidden states
    trunk: int = 0  # KV layers [0, trunk) hold one row per reply (a shared trunk), the others one per row

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.mask.shape[0])

    def offsets(self) -> list[int]:
        out, o = [], 0
        for s in self.seqs:
            out.append(o)
            o += s.rows
        return out

    def row_index(self, keep: list[int]) -> torch.Tensor:
        """The backbone rows of replies ``keep`` (indices into ``seqs``), in that order."""
        offs = self.offsets()
        return torch.tensor([offs[i] + r for i in keep for r in range(self.seqs[i].rows)], dtype=torch.long,
                            device=self.mask.device)

    def select_seqs(self, keep: list[int], *, cut: int = 0, consume: bool = False) -> RunningBatch:
        """A batch of replies ``keep`` (indices into ``seqs``, any order, repeats allowed: n > 1 choices fork one
        prefill), sharing nothing with this one, without its first ``cut`` positions (left padding every kept row
        has). ``consume``: this batch is being replaced, so each layer is released once copied (the copy's peak is
        the new cache and one old layer, not both caches)."""
        idx = self.row_index(keep)
        groups = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        cache = RunningCache()
        n = self.length - cut
        for li, layer in enumerate(_layers(self.cache)):
            rows = groups if li < self.trunk else idx
            kb, vb = _room_like(layer.keys, len(rows), n), _room_like(layer.values, len(rows), n)
            kb[:, :, :n].copy_(layer.keys[:, :, cut:].index_select(0, rows))
            vb[:, :, :n].copy_(layer.values[:, :, cut:].index_select(0, rows))
            new = GrowingLayer()
            new.adopt(kb, vb, n)
            cache.layers.append(new)
            if consume:
                _release(layer)
        return RunningBatch([self.seqs[i] for i in keep], cache, self.mask[:, cut:].index_select(0, idx),
                            self.pos.index_select(0, idx), self.coef.index_select(0, idx), self.h.index_select(0, idx),
                            self.trunk)

    def filter(self, alive: list[Seq]) -> RunningBatch | None:
        """TGI's ``filter``: keep the rows of ``alive`` replies; trim left padding no row needs any more (in whole
        :data:`PAD_ALIGN` blocks). None when nothing is left. This batch is consumed when a new one is made."""
        keep = [i for i, s in enumerate(self.seqs) if any(s is a for a in alive)]
        if not keep:
            return None
        if len(keep) == len(self.seqs):
            return self
        masked = self.mask.index_select(0, self.row_index(keep)).cumsum(1) == 0
        free = int(masked.sum(1).min())  # leading columns masked in every kept row: trimmed in whole blocks
        return self.select_seqs(keep, cut=free - free % PAD_ALIGN, consume=True)

    def concatenate(self, other: RunningBatch) -> RunningBatch:
        """TGI's ``concatenate``: one batch of both, the shorter one's KV and mask left-padded to the longer. Both
        batches are consumed: each layer is copied into the joined buffer (with a block of room) and released."""
        if self.trunk != other.trunk:
            raise ValueError(f"cannot join batches with different shared trunks ({self.trunk} vs {other.trunk})")
        length = max(self.length, other.length)
        cache = RunningCache()
        for la, lb in zip(_layers(self.cache), _layers(other.cache), strict=True):
            ra, rows = la.keys.shape[0], la.keys.shape[0] + lb.keys.shape[0]  # a trunk layer: one row per reply
            kb, vb = _room_like(la.keys, rows, length), _room_like(la.values, rows, length)
            for buf, a, b in ((kb, la.keys, lb.keys), (vb, la.values, lb.values)):
                for part, src in ((buf[:ra], a), (buf[ra:], b)):
                    pad = length - src.shape[2]
                    part[:, :, :pad].zero_()
                    part[:, :, pad:length].copy_(src)
            new = GrowingLayer()
            new.adopt(kb, vb, length)
            cache.layers.append(new)
            _release(la)
            _release(lb)
        mask = torch.cat([_pad_left(b.mask, length - b.length, 1) for b in (self, other)])
        return RunningBatch(self.seqs + other.seqs, cache, mask, torch.cat([self.pos, other.pos]),
                            torch.cat([self.coef, other.coef]), torch.cat([self.h, other.h]), self.trunk)


def _release(layer: Any) -> None:
    """Free a consumed layer's tensors (a GrowingLayer's buffers too)."""
    if isinstance(layer, GrowingLayer):
        layer.release()
    else:
        layer.keys = layer.values = None


_LIBC: Any = None


def trim_freed_memory() -> bool:
    """Give the free pages of malloc's heap back to the system (glibc's ``malloc_trim(0)``). Called after a join or
    a retire has released the old cache. Why: the running cache's buffers are large, short-lived and of ever-changing
    sizes; glibc raises its mmap threshold to the size of each mmapped block it frees (up to 32 MiB), so later
    buffers come from the heap, which fragments and keeps its free memory — a flood of 500 requests grew the server
    1.10-1.32x its KV budget (bench/RESULTS.md, "The flood's memory"). Fixing the mmap threshold instead (every block
    of 128 KiB or more its own mapping) returned the memory too, but made every decode step 35% slower: the forward's
    activations then page-fault afresh at every step. Trimming after a join or retire costs one trim per batch change.
    False (a no-op) off glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _LIBC.malloc_trim  # noqa: B018 - glibc only (musl has none)
        except (OSError, AttributeError):
            _LIBC = False
    return bool(_LIBC and _LIBC.malloc_trim(0))


def kv_bytes_per_row_token(model_config: Any, dtype: torch.dtype) -> int:
    """KV bytes one backbone row takes per cached position: keys and values of every layer."""
    cfg = model_config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 2 * layers * kv * head_dim * torch.empty((), dtype=dtype).element_size()


def activation_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """A forward's work memory per token-row outside the KV cache, roughly: (6 x hidden + 3 x intermediate) numbers
    (~32 KB for SmolLM2-135M in float32)."""
    cfg = model_config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    return (6 * hidden + 3 * inter) * torch.empty((), dtype=dtype).element_size()


def default_kv_budget(device: torch.device) -> int:
    """Default KV byte budget: a quarter of the free accelerator memory, or of the available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.25 * free)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        return int(0.25 * info.get("MemAvailable", 4 << 30))
    except OSError:
        return 1 << 30

"""The prompt-prefix cache of the step scheduler: vLLM's automatic prefix caching, narrowed to the one prefix that
every request of ``emorl serve`` shares — the chat template's head with the run's system prompt, up to the user's
statement (26 of the 38-48 tokens of a short statement's prompt, SmolLM2's template, the default run's system
prompt).

A new prompt's prefill then starts after that prefix: its keys and values come from the cache, and only the
statement and the generation prompt are computed (with the left padding in front of them, which is computed too
without the cache). Why keyed by (a row's LoRA coefficients, the prefix's alignment):

- A row's keys and values depend on its adapter at every adapted layer, so each stream (one-hot coefficients, the
  base's zeros, a ``params`` row's weights) has its own entry.
- CPU attention reduces keys in 16-lane vectors, so a prefix whose first token sits at another position modulo
  :data:`~emorl.prompts.PAD_MULTIPLE` rounds differently (``encode_prompts``). An entry is computed at the alignment
  the prompt has in its batch (1-16 pads in front), so a reused prefix holds the bits the prompt's own prefill
  would have computed, and a reply still equals ``emorl generate`` for its request alone (tests/test_serve_prefix.py).

A prompt that does not begin with the prefix (its own system message, a cut template) is prefilled whole. Entries are
replaced oldest first beyond ``max_bytes``; the scheduler counts ``max_bytes`` and the forward that computes entries
in the KV budget (``StepScheduler.prefix_reserve``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from emorl.lora_bank import safe_rows
from emorl.prompts import PAD_MULTIPLE, aligned_width
from emorl.serve.batch import GrowingLayer, RunningCache

FORWARD_TOKENS = 128  # most token-rows of one forward computing entries; the scheduler keeps room for its KV and
# activations in the KV budget (one forward for a flood's 20 new entries had taken ~90 MB, bench/RESULTS.md)
Key = tuple[tuple[float, ...], int]  # (a row's LoRA coefficients, pads in front of the prefix: 1..PAD_MULTIPLE)
Entry = torch.Tensor  # (layers, 2: keys and values, heads, P, head_dim) of the prefix


def shared_prefix(tokenizer: Any, system_prompt: str | None) -> list[int]:
    """The token ids every single-statement prompt of this tokenizer and system prompt begins with: the common
    prefix of two rendered prompts whose statements share no first character (``[]`` without a chat template)."""
    from emorl.data import format_prompts

    if not getattr(tokenizer, "chat_template", None):
        return []
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in format_prompts(tokenizer, ["a", "Zebra 1"], False, system_prompt))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def align(pads: int) -> int:
    """The pads an entry is computed behind for a prompt with ``pads`` left pads: the same count modulo 16, >= 1."""
    return (pads - 1) % PAD_MULTIPLE + 1


@dataclass
class Plan:
    """How a prefill group reuses the prefix."""

    pads: list[int]  # each row's left padding
    keys: list[Key]  # each row's entry
    start: int  # the first position the prefill computes


class PrefixCache:
    """Keys and values of the shared prefix per (row coefficients, alignment); see the module docstring.

    Entries live in one slab of ``max_bytes`` (slots), allocated once: entries come and go with traffic, and ~60
    small tensors per entry made and freed at each eviction fragmented the heap (a flood's peak memory)."""

    def __init__(self, tokens: list[int], max_bytes: int, pad_id: int, text: str = "") -> None:
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.text = text  # the prefix as text (admission's estimate of which waiting prompts begin with it)
        self.max_bytes, self.pad_id = max_bytes, pad_id
        self.entries: OrderedDict[Key, int] = OrderedDict()  # key -> its slot, oldest first
        self.slab: torch.Tensor | None = None  # (slots, layers, 2, heads, P, head_dim)
        self._free: list[int] = []
        self._pinned: set[Key] = set()  # the keys of the plan being assembled: never evicted under it

    @property
    def length(self) -> int:
        return int(self.tokens.numel())

    @property
    def bytes(self) -> int:
        if self.slab is None:
            return 0
        return len(self.entries) * self.slab[0].numel() * self.slab.element_size()

    def plan(self, ids: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, groups: int) -> Plan | None:
        """The reuse plan of a prefill over left-padded ``ids`` / ``mask`` whose rows have LoRA coefficients
        ``coef``, or None when a row does not begin with the prefix. ``groups``: rows of its shared-trunk forward
        (the rows otherwise). The first computed position leaves a width whose matmuls round each row as alone
        (:func:`~emorl.lora_bank.safe_rows`: at least 12 token-rows, or a multiple of 4)."""
        p, width = self.length, int(ids.shape[1])
        if p == 0 or self.max_bytes <= 0:
            return None
        pads = (mask.cumsum(1) == 0).sum(1).tolist()
        tokens = self.tokens.to(ids.device)
        for r, n in enumerate(pads):
            if n + p >= width or not bool((ids[r, n:n + p] == tokens).all()):
                return None
        start = min(pads) + p
        while start > 0 and any(safe_rows(m * (width - start)) != m * (width - start) for m in (groups, len(pads))):
            start -= 1
        if start <= min(pads):
            return None
        keys = [(tuple(float(c) for c in coef[r].tolist()), align(n)) for r, n in enumerate(pads)]
        return Plan(pads, keys, start)

    def take(self, plan: Plan) -> tuple[dict[Key, Entry], list[Key]]:
        """The plan's entries held now (marked as just used, and pinned until :meth:`assemble`) and its keys
        without one, each once."""
        held: dict[Key, Entry] = {}
        assert self.slab is not None or not self.entries
        for k in plan.keys:
            if k in self.entries:
                held[k] = self.slab[self.entries[k]]  # type: ignore[index]
                self.entries.move_to_end(k)
        self._pinned = set(held)
        return held, list(dict.fromkeys(k for k in plan.keys if k not in held))

    def batches(self, keys: list[Key]) -> list[list[Key]]:
        """``keys`` in forwards of at most :data:`FORWARD_TOKENS` token-rows (one key at least)."""
        width = aligned_width(PAD_MULTIPLE + self.length)  # the widest a forward may be
        per = max(1, FORWARD_TOKENS // width)
        return [keys[i:i + per] for i in range(0, len(keys), per)]

    def prefix_inputs(self, keys: list[Key], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, mask and LoRA coefficients of a forward computing the entries of ``keys``: row i holds its
        alignment's pads, the prefix, then pads (after the prefix: causal attention never reads them) up to a
        width that is a multiple of :data:`~emorl.prompts.PAD_MULTIPLE`, as a prompt's batch is (CPU attention
        rounds by the key length's blocks of 16)."""
        p, most = self.length, max(a for _, a in keys)
        width = aligned_width(most + p)
        ids = torch.full((len(keys), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, a) in enumerate(keys):
            ids[i, a:a + p] = self.tokens
            mask[i, a:a + p] = 1
        coef = torch.tensor([c for c, _ in keys], dtype=torch.float32)
        return ids.to(device), mask.to(device), coef.to(device)

    def store(self, keys: list[Key], cache: Any) -> dict[Key, Entry]:
        """Entries of ``keys`` from the cache of their :meth:`prefix_inputs` forward, copied into free slots or
        the oldest entries' (never a pinned one's); an entry with no slot left is kept for this plan only."""
        p, layers = self.length, list(cache.layers)
        k0 = layers[0].keys
        if self.slab is None:
            per = len(layers) * 2 * k0.shape[1] * p * k0.shape[3] * k0.element_size()
            slots = self.max_bytes // per
            if slots:
                self.slab = k0.new_empty((slots, len(layers), 2, k0.shape[1], p, k0.shape[3]))
                self._free = list(range(slots))
        out: dict[Key, Entry] = {}
        for i, key in enumerate(keys):
            slot = self._slot()
            if slot is None:
                e = k0.new_empty((len(layers), 2, k0.shape[1], p, k0.shape[3]))
            else:
                assert self.slab is not None
                e = self.slab[slot]
                self.entries[key] = slot
            a = key[1]
            for li, layer in enumerate(layers):
                e[li, 0].copy_(layer.keys[i, :, a:a + p])
                e[li, 1].copy_(layer.values[i, :, a:a + p])
            out[key] = e
            self._pinned.add(key)
        return out

    def _slot(self) -> int | None:
        """A free slot, or the oldest unpinned entry's; None when every slot is pinned (or there is no slab)."""
        if self._free:
            return self._free.pop()
        for k in self.entries:
            if k not in self._pinned:
                return self.entries.pop(k)
        return None

    def limit(self, max_bytes: int) -> None:
        """Hold at most ``max_bytes`` from now on (the KV budget changed): a slab of another size starts empty."""
        if max_bytes != self.max_bytes:
            self.max_bytes = max_bytes
            self.entries.clear()
            self.slab, self._free = None, []

    def assemble(self, plan: Plan, found: dict[Key, Entry], width: int, trunk: int, first: list[int] | None
                 ) -> RunningCache:
        """The prefill's cache over positions [0, plan.start) from the entries ``found`` for the plan's keys: each
        row's prefix (its part before the start) at its own columns, zeros in its left padding; room up to
        ``width`` (the prefill's chunks write there; the running batch it joins copies it with its own room).
        Layers below ``trunk`` hold the rows ``first`` (one per group: a shared trunk's rows are identical
        there)."""
        entries = [found[k] for k in plan.keys]
        cache = RunningCache()
        start = plan.start
        for li in range(len(entries[0])):
            rows = first if (first is not None and li < trunk) else list(range(len(plan.keys)))
            k0 = entries[0][li, 0]  # (heads, P, head_dim)
            kb = k0.new_zeros((len(rows), k0.shape[0], width, k0.shape[2]))
            vb = torch.zeros_like(kb)
            for i, r in enumerate(rows):
                n = plan.pads[r]
                if start > n:
                    kb[i, :, n:start] = entries[r][li, 0, :, :start - n]
                    vb[i, :, n:start] = entries[r][li, 1, :, :start - n]
            layer = GrowingLayer()
            layer.adopt(kb, vb, start)
            cache.layers.append(layer)
        self._pinned = set()
        return cache

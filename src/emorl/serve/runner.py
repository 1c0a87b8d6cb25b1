"""The model runner of the step scheduler (vLLM v1's ``ModelRunner`` role): it executes what the scheduler decided
— a chunk of a prefill, or one decode step of a :class:`~emorl.serve.batch.RunningBatch` — and turns each reply's
rows into its next token. It owns the model, the LoRA bank and the tokenizer of the decode thread; only that
thread calls it.

Every row carries its LoRA coefficients (:meth:`emorl.lora_bank.LoraBank.set_row_weights`), so rows of hidden,
logits and probs mixes, parameter mixes, single adapters and the base run in ONE forward. A reply's next-token
scores are its mode's rule over its rows, as :func:`emorl.ensemble.mixing.mix_scores` computes them
(``(1 - sum w) x_0 + sum w_k x_k`` for anchored points, in float32), then transformers' warpers and
:func:`emorl.sampling.choose` with the reply's own uniforms.

A shared trunk (issue 24): when no loaded adapter has a LoRA layer below decoder layer L (``lora.layers: top:N``),
a reply's rows are identical there, so layers 0..L-1 run on one row per reply (its group) and
:class:`~emorl.ensemble.streams.FanOut` copies each group into its rows at layer L; the KV cache of the trunk holds
one row per reply (:class:`~emorl.serve.batch.RunningBatch`). A one-row reply (params, a single adapter) costs the
same either way; a base-anchored K = 3 mix runs 1 row instead of 4 below L.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from emorl.ensemble.streams import FanOut
from emorl.lora_bank import lora_bank, safe_rows
from emorl.models import output_cache, position_ids
from emorl.sampling import choose
from emorl.serve.batch import RunningBatch, RunningCache, Seq, trunk_layout
from emorl.serve.prefix import PrefixCache, shared_prefix


def step_rows(n: int, device: torch.device) -> int:
    """The row count a decode step or the LM head runs ``n`` rows at: on the CPU :func:`~emorl.lora_bank.safe_rows`
    (a CPU kernel workaround: some row counts round a row differently from the same row alone), elsewhere ``n``."""
    return safe_rows(n) if device.type == "cpu" else n


def _expand(idx: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.index_select(0, idx) for t in ts]


def _padded(n: int, device: torch.device) -> torch.Tensor:
    """Indices 0..n-1 with the last repeated up to :func:`step_rows` (n)."""
    padded = step_rows(n, device)
    return torch.cat([torch.arange(n), torch.full((padded - n,), n - 1)]).to(device)


class Prefill:
    """A group of new replies being prefilled, ``chunk`` positions per step (a long prompt does not stall the
    running batch: the scheduler runs a decode step between chunks)."""

    def __init__(self, seqs: list[Seq], ids: torch.Tensor, mask: torch.Tensor, fork: list[int]) -> None:
        self.seqs, self.ids, self.mask, self.fork = seqs, ids, mask, fork  # fork: seq -> its prefill row group
        self.done = 0  # positions prefilled so far
        self.cache: Any = None
        self.h: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


class Runner:
    """Executes prefill chunks and decode steps for the scheduler (see the module docstring)."""

    def __init__(self, ens: Any, adapters: list[str], stats: dict[str, Any] | None = None) -> None:
        self.ens = ens
        self.adapters = adapters
        self.decoder = ens.stream.decoder
        self.kw = ens.stream.kw
        self._stack = contextlib.ExitStack()
        self.bank: Any = None
        self._stops: dict[tuple[str, ...], Any] = {}
        self.layers = ens.stream.layers
        trunk = ens.trunk(adapters)
        self.trunk = trunk if 0 < trunk < len(self.layers) else 0  # every layer shared: no adapter at all, no gain
        self._prefix: PrefixCache | None = None  # made by prefix_cache()
        self._stacks: dict[Any, Any] = {}  # the bank's stacked adapters, made on the first hold, reused after
        self.stats = stats if stats is not None else {}
        for key in ("prefix_reused_token_rows", "prefix_computed_rows"):
            self.stats.setdefault(key, 0)

    # ------------------------------------------------------------------------------------------- the bank

    def hold(self) -> None:
        """Enter the LoRA bank (kept while there is work). The served adapters do not change, so their stacked A
        and B are made on the first hold only: a request that finds the server idle does not pay for stacking."""
        if self.bank is None:
            self.bank = self._stack.enter_context(lora_bank(self.ens.model, self.adapters, stacks=self._stacks))

    def release(self) -> None:
        """Leave the bank when idle, so the model is plain again (``EnsembleModel.generate`` may use it)."""
        if self.bank is not None:
            self._stack.close()
            self.bank = None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, coef: torch.Tensor,
                 cache: Any, fan: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """The backbone over ``ids`` (one row per group with ``fan``: row r of the layers above the trunk copies
        group ``fan[r]``; else one per row), every row's LoRA coefficients ``coef``; the rows' last hidden states."""
        self.bank.set_row_weights(coef)
        kwargs = {self.kw: cache} if cache is not None else {}
        fanout = FanOut(self.layers[self.trunk:], 1, ids.shape[0], fan) if fan is not None else contextlib.nullcontext()
        with fanout:
            out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
        return out.last_hidden_state[:, -1], output_cache(out)

    # ------------------------------------------------------------------------------------------- execution

    def prefill_chunk(self, pf: Prefill, chunk: int) -> bool:
        """Prefill the next ``chunk`` positions of ``pf``; True once the prompt is done."""
        firsts = self._firsts(pf)
        coef = torch.cat([s.coef for s in firsts])
        ids, mask, fan, first = pf.ids, pf.mask, None, None
        if self.trunk:  # one row per group below the trunk: the group's first row (its rows are the same prompt)
            first, fan = trunk_layout(firsts, ids.device)
        if pf.cache is None:
            self._reuse_prefix(pf, coef, first)
        end = min(pf.ids.shape[1], pf.done + chunk)
        if first is not None:
            ids, mask = ids.index_select(0, first), mask.index_select(0, first)
        pos = position_ids(mask)[:, pf.done:end]
        with torch.inference_mode():
            pf.h, pf.cache = self._forward(ids[:, pf.done:end], mask[:, :end], pos, coef,
                                           RunningCache() if pf.cache is None else pf.cache, fan)
        pf.done = end
        return end == pf.ids.shape[1]

    def prefix_cache(self, max_bytes: int) -> PrefixCache | None:
        """The prompt-prefix cache (:mod:`emorl.serve.prefix`) held to ``max_bytes``, made on first use on the
        decode thread (it tokenises with the decode thread's tokenizer); None when ``max_bytes`` is 0 (disabled) or
        the model is a seq2seq one. The scheduler calls this at each admission, so a prefill's
        :meth:`_reuse_prefix` finds it."""
        if self.ens.base.is_seq2seq:
            return None
        if self._prefix is None:
            tok = self.ens.tokenizer
            tokens = shared_prefix(tok, self.ens.base.config.system_prompt)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            tokens = tokens if len(tokens) >= 4 else []
            self._prefix = PrefixCache(tokens, max_bytes, int(pad), tok.decode(tokens) if tokens else "")
        self._prefix.limit(max_bytes)
        return self._prefix if max_bytes > 0 else None

    @property
    def prefix_bytes_held(self) -> int:
        return self._prefix.bytes if self._prefix is not None else 0

    def _reuse_prefix(self, pf: Prefill, coef: torch.Tensor, first: torch.Tensor | None) -> None:
        """Start ``pf`` after the shared prefix when every row begins with it: its keys and values from the cache,
        computing the entries it lacks first (a few per forward). Leaves ``pf`` as it is otherwise (no cache, or a
        disabled one: its plan is None)."""
        cache = self._prefix
        if cache is None:
            return
        plan = cache.plan(pf.ids, pf.mask, coef, len(first) if first is not None else pf.rows)
        if plan is None:
            return
        found, miss = cache.take(plan)
        for part in cache.batches(miss):  # a few rows per forward: its transient KV stays a few MB
            ids, mask, c = cache.prefix_inputs(part, pf.ids.device)
            with torch.inference_mode():
                _, out = self._forward(ids, mask, position_ids(mask), c, DynamicCache())
            found.update(cache.store(part, out))  # may evict some of ``found`` from the cache: kept here
            self.stats["prefix_computed_rows"] += len(part)
        pf.cache = cache.assemble(plan, found, int(pf.ids.shape[1]), self.trunk,
                                  first.tolist() if first is not None else None)
        pf.done = plan.start
        self.stats["prefix_reused_token_rows"] += sum(plan.start - n for n in plan.pads if plan.start > n)

    @staticmethod
    def _firsts(pf: Prefill) -> list[Seq]:
        """One reply per prefill row group (choices of one request share their prompt's prefill)."""
        seen: dict[int, Seq] = {}
        for s, g in zip(pf.seqs, pf.fork, strict=True):
            seen.setdefault(g, s)
        return [seen[g] for g in sorted(seen)]

    def finish_prefill(self, pf: Prefill) -> RunningBatch:
        """The prefilled rows as a running batch, one row group per reply (choices forked from their prompt's)."""
        firsts = self._firsts(pf)
        assert pf.h is not None
        pre = RunningBatch(firsts, pf.cache, pf.mask, position_ids(pf.mask)[:, -1] + 1,
                           torch.cat([s.coef for s in firsts]), pf.h, self.trunk)
        out = pre.select_seqs(pf.fork, consume=True)
        out.seqs = list(pf.seqs)
        return out

    def step(self, batch: RunningBatch) -> None:
        """One decode step: feed every reply's last token through its rows. On the CPU a batch of an unsafe row
        count (:func:`step_rows`) runs with its last row repeated, so its rows round as they would alone."""
        dev = batch.mask.device
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.n_rows, 1)], dim=1)
        n = batch.n_rows
        idx = _padded(n, dev)  # rows, the last repeated
        padded = len(idx)
        coef = batch.coef if padded == n else batch.coef.index_select(0, idx)
        if batch.trunk:  # the trunk runs one row per reply (its first row's mask and position), a safe count too
            g = len(batch.seqs)
            gidx = _padded(g, dev)
            gpad = len(gidx)
            first, group = trunk_layout(batch.seqs, dev)
            first = first.index_select(0, gidx)
            feed = torch.tensor([s.tokens[-1] for s in batch.seqs], dtype=torch.long, device=dev).index_select(0, gidx)
            mask, pos, fan = batch.mask.index_select(0, first), batch.pos.index_select(0, first), \
                group.index_select(0, idx)
        else:
            g = gpad = 0
            gidx = idx
            feed = torch.tensor([s.tokens[-1] for s in batch.seqs for _ in range(s.rows)], dtype=torch.long,
                                device=dev)
            mask, pos, fan = batch.mask, batch.pos, None
            if padded > n:
                feed, mask, pos = _expand(idx, feed, mask, pos)
        cache = batch.cache
        trimmed = (padded > n, gpad > g)
        if any(trimmed):  # layers padded to their safe row count (the trunk's by group, the rest by row)
            cache = type(batch.cache)()
            for li, layer in enumerate(batch.cache.layers):
                rows = gidx if li < batch.trunk else idx
                cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), li)
        with torch.inference_mode():
            h, cache = self._forward(feed[:, None], mask, pos[:, None], coef, cache, fan)
        if any(trimmed):
            h = h[:n]
            for li, layer in enumerate(cache.layers):
                keep = g if li < batch.trunk else n
                layer.keys, layer.values = layer.keys[:keep], layer.values[:keep]
        batch.h, batch.cache = h, cache
        batch.pos = batch.pos + 1

    # ------------------------------------------------------------------------------------------- tokens

    def next_tokens(self, seqs: list[Seq], h: torch.Tensor) -> list[int]:
        """Each reply's next token from its rows' hidden states ``h`` (seq-contiguous rows)."""
        with torch.inference_mode():
            scores = self.scores(seqs, h)
            scores = self.warp(seqs, scores)
            t = [len(s.tokens) for s in seqs]
            u = None
            if any(s.u is not None for s in seqs):
                u = torch.tensor([float(s.u[i]) if s.u is not None else 0.5 for s, i in zip(seqs, t, strict=True)],
                                 dtype=torch.float32, device=scores.device)
            return choose(scores, u).tolist()

    def scores(self, seqs: list[Seq], h: torch.Tensor) -> torch.Tensor:
        """Mixed next-token scores (replies, V), by each reply's mode over its rows."""
        dev = h.device

        def head(x: torch.Tensor) -> torch.Tensor:  # the LM head over a safe row count (see step_rows)
            n = x.shape[0]
            m = step_rows(n, x.device)
            return self.ens.head(x if m == n else torch.cat([x, x[-1:].expand(m - n, -1)]))[:n]

        s_max = max(s.rows for s in seqs)
        idx = torch.zeros(len(seqs), s_max, dtype=torch.long, device=dev)
        wt = torch.zeros(len(seqs), s_max, dtype=torch.float32, device=dev)
        o = 0
        for i, s in enumerate(seqs):
            idx[i, : s.rows] = torch.arange(o, o + s.rows, device=dev)
            idx[i, s.rows:] = o
            wt[i, : s.rows] = s.mix
            o += s.rows
        out: torch.Tensor | None = None
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault("hidden" if s.mode in ("hidden", "params") else s.mode, []).append(i)
        for mode, members in groups.items():
            m = torch.tensor(members, dtype=torch.long, device=dev)
            if mode == "hidden":  # params rows have one row of weight 1: head(h) exactly
                sc = head((h[idx[m]].to(torch.float32) * wt[m][:, :, None]).sum(1))
            else:  # the head over these replies' rows only (a safe row count, as every head call here)
                rows, inv = torch.unique(idx[m], return_inverse=True)
                ls = torch.log_softmax(head(h.index_select(0, rows)), dim=-1)[inv]  # (a, S, V)
                w = wt[m][:, :, None]
                sc = (ls * w).sum(1) if mode == "logits" else torch.logsumexp(ls + torch.log(w), dim=1)
            if out is None:
                out = sc.new_empty(len(seqs), sc.shape[-1])
            out[m] = sc
        assert out is not None
        return out

    def warp(self, seqs: list[Seq], scores: torch.Tensor) -> torch.Tensor:
        """transformers' warpers per reply setting (temperature, top-k, top-p: ``generate``'s order); greedy
        replies among sampled ones get a one-hot distribution at their argmax (``choose`` returns it)."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        sc = scores.clone()
        dummy = torch.zeros(len(seqs), 1, dtype=torch.long, device=sc.device)
        steps = ((lambda p: p.temperature if p.do_sample and p.temperature != 1.0 else None, TemperatureLogitsWarper),
                 (lambda p: p.top_k if p.do_sample and p.top_k else None, TopKLogitsWarper),
                 (lambda p: p.top_p if p.do_sample and p.top_p < 1.0 else None, TopPLogitsWarper))
        for value, warper in steps:
            groups: dict[Any, list[int]] = {}
            for i, s in enumerate(seqs):
                v = value(s.spec)
                if v is not None:
                    groups.setdefault(v, []).append(i)
            for v, members in groups.items():
                pos = torch.tensor(members, dtype=torch.long, device=sc.device)
                sc[pos] = warper(v)(dummy[pos], sc[pos])
        if any(s.u is not None for s in seqs):
            greedy = [i for i, s in enumerate(seqs) if s.u is None]
            if greedy:
                g = torch.tensor(greedy, dtype=torch.long, device=sc.device)
                top = sc[g].argmax(-1)
                sc[g] = torch.full_like(sc[g], float("-inf")).scatter_(1, top[:, None], 0.0)
        return sc

    def ended(self, seq: Seq) -> str | None:
        """Why ``seq`` ends after its last token (stop: EOS or a stop string; length), or None."""
        if seq.tokens[-1] in self.ens.eos:
            return "stop"
        if seq.spec.stop:
            stops = tuple(seq.spec.stop)
            if stops not in self._stops:
                from transformers import StopStringCriteria

                self._stops[stops] = StopStringCriteria(self.ens.tokenizer, list(stops))
            if bool(self._stops[stops](torch.tensor([seq.tokens]), None)[0]):
                return "stop"
        return "length" if len(seq.tokens) >= seq.spec.max_new_tokens else None

    def text(self, seq: Seq) -> str:
        return self.ens._text(torch.tensor(seq.tokens), list(seq.spec.stop))

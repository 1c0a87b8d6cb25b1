"""The step scheduler of ``emorl serve`` (iteration-level batching, as Orca, vLLM and TGI do): vLLM v1's loop
``schedule → execute → update`` over one running batch.

Every iteration: (1) drop waiting requests whose client is gone; (2) admit waiting requests, oldest first, into a
prefill group while the KV byte budget holds their worst case (prompt + ``max_tokens`` for every row, the batch's
left padding included) and the group's prompt tokens x rows stay within ``max_prefill_tokens``; (3) run one chunk
of the prefill (``prefill_chunk`` positions, at most ``max_prefill_tokens`` token-rows), and once the prompt is done
sample each new reply's first token and concatenate its rows into the running batch; a group whose prefill started
and ended in this iteration leaves the rest of the iteration's prefill budget (``max_prefill_tokens`` token-rows)
to requests that arrived during it, admitted and prefilled as a next group before the step (vLLM's per-step token
budget: a burst whose first request is already being prefilled does not wait a decode step for the rest); (4) run
ONE decode step of the running batch, if any; (5) report tokens, finish replies (EOS, stop string, length,
cancelled) and filter their rows out. A short request that arrives while a long one decodes starts at the next
iteration instead of waiting for the long one to end.

Decodes keep their place the way vLLM's "decodes first" budget keeps it: every iteration advances every running
reply by one token, and prompts take at most ``max_prefill_tokens`` token-rows of prefill per iteration (one
bounded chunk of a long prompt, or a few short groups), so a long prompt delays the running replies by one chunk
per token, never by its whole prefill. The chunk runs before the step, not after it: the
running replies wait the same (one chunk and one step per token either way), while a new request's first token no
longer waits for a step of the running batch, and its rows join that same iteration's step (bench/RESULTS.md, head
of line).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from emorl.ensemble.pairs import PairResult
from emorl.prompts import aligned_width
from emorl.sampling import uniforms
from emorl.serve.batch import (
    KV_BLOCK,
    RunningBatch,
    Seq,
    activation_bytes_per_token,
    kv_bytes_per_row_token,
    trim_freed_memory,
)
from emorl.serve.prefix import FORWARD_TOKENS, PrefixCache
from emorl.serve.runner import Prefill, Runner

log = logging.getLogger("emorl.serve")


def stream_coefs(key: str, weights: list[float], n_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reply's rows: (S, K_all) LoRA coefficients and (S,) float32 output weights. Mixes: one row per adapter
    with w > 0 (one-hot), then the base row (coefficients 0) when anchored, weighted 1 - sum w; params: one row
    whose coefficients are the weights; a one-policy model or the base: one row."""
    mode = key.removesuffix("+base")
    if mode == "params":
        return torch.tensor([weights], dtype=torch.float32), torch.ones(1, dtype=torch.float32)
    used = [i for i, w in enumerate(weights) if w > 0]
    coef = torch.zeros(len(used) + (1 if key.endswith("+base") else 0), n_adapters)
    for r, i in enumerate(used):
        coef[r, i] = 1.0
    mix = torch.tensor([weights[i] for i in used], dtype=torch.float32)
    if key.endswith("+base"):
        mix = torch.cat([mix, 1.0 - mix.sum(0, keepdim=True)])
    return coef, mix


class StepScheduler:
    """The step loop over an :class:`~emorl.serve.engine.Engine`'s queue (run on its decode thread)."""

    def __init__(self, engine: Any) -> None:
        self.e = engine
        self.runner = Runner(engine.ens, engine.adapters, engine.stats)
        self.n_adapters = len(engine.adapters)
        dtype = next(engine.ens.model.parameters()).dtype
        self.kv_per_row_token = kv_bytes_per_row_token(engine.ens.stream.decoder.config, dtype)
        self.act_per_token = activation_bytes_per_token(engine.ens.stream.decoder.config, dtype)
        # with a shared trunk a reply keeps one KV row (not one per stream) in the layers below it
        self.n_layers = max(1, len(engine.ens.stream.layers))
        self.trunk = self.runner.trunk
        self.running: RunningBatch | None = None
        self.prefill: Prefill | None = None
        st = engine.stats
        for key in ("steps", "prefills", "max_running_rows", "max_running_jobs", "kv_bytes_reserved",
                    "max_kv_bytes_reserved", "trims"):
            st.setdefault(key, 0)

    # ------------------------------------------------------------------------------------------- budget

    @property
    def prefix_slab(self) -> int:
        """The prompt-prefix cache's entries: a 16th of the KV budget, at most 128 MiB (an entry per stream and
        alignment, :mod:`emorl.serve.prefix`: ~1.1 MiB for SmolLM2-135M in float32 with the default system prompt,
        so a base-anchored K = 3 mix's 4 streams x 16 alignments take ~73 MiB)."""
        return min(128 << 20, self.e.kv_budget // 16) if self.e.prefix_cache else 0

    @property
    def prefix_reserve(self) -> int:
        """The prompt-prefix cache's share of the KV budget: its entries, and the work of a forward computing them
        (:data:`~emorl.serve.prefix.FORWARD_TOKENS` token-rows: their keys and values, and activations about as
        large)."""
        slab = self.prefix_slab
        return slab + FORWARD_TOKENS * 2 * self.kv_per_row_token if slab else 0

    @property
    def work_reserve(self) -> int:
        """The KV budget's share for one prefill's work memory outside the KV cache: its activations, about
        (6 x hidden + 3 x intermediate) numbers per token-row (~32 KB for SmolLM2-135M in float32) x
        ``max_prefill_tokens``, at most a 16th of the budget. Kept so that the budget bounds what the server adds
        to its loaded size (a flood's peak, bench/RESULTS.md)."""
        return min(self.e.kv_budget // 16, self.e.max_prefill_tokens * self.act_per_token)

    @property
    def reserve(self) -> int:
        """What the KV budget keeps beside the requests' KV: the prefix cache's share and one prefill's work."""
        return self.prefix_reserve + self.work_reserve

    def prefill_tokens(self, job: Any, cache: PrefixCache | None = None) -> int:
        """Token-rows a job's prefill computes: its streams (choices fork after the prefill) x its padded width,
        less the shared prefix of ``cache`` when its prompt begins with it (an estimate: a prefill computes no more
        than ``max_prefill_tokens`` // rows positions at once whatever this says)."""
        width = self.job_width(job)
        if cache is not None and cache.length and job.pairs[0].text.startswith(cache.text):
            width = max(12, width - cache.length)
        return self.job_rows(job) // len(job.pairs) * width

    def _prefix(self) -> PrefixCache | None:
        """The runner's prompt-prefix cache, held to :attr:`prefix_slab` (the budget may have changed)."""
        return self.runner.prefix_cache(self.prefix_slab)

    def job_rows(self, job: Any) -> int:
        coef, _ = stream_coefs(job.key, list(job.pairs[0].weights), self.n_adapters)
        return coef.shape[0] * len(job.pairs)

    def kv_bytes(self, rows: int, replies: int, positions: int) -> int:
        """KV bytes of ``rows`` backbone rows of ``replies`` replies over ``positions`` positions: every layer per
        row, except the shared trunk's layers, which hold one row per reply."""
        per_layer = self.kv_per_row_token / self.n_layers
        return int((rows * (self.n_layers - self.trunk) + replies * self.trunk) * positions * per_layer)

    def job_bytes(self, job: Any) -> int:
        """A job's worst-case KV bytes alone."""
        return self.kv_bytes(self.job_rows(job), len(job.pairs), self.job_worst_len(job))

    @staticmethod
    def job_width(job: Any) -> int:
        return aligned_width(job.prompt_tokens + 1)  # encode_prompts' padded width

    def job_worst_len(self, job: Any) -> int:
        """KV positions a job's rows may take: its prompt, its longest reply, the running cache's growth room."""
        return self.job_width(job) + max(p.max_new_tokens for p in job.pairs) + KV_BLOCK

    def reserved(self, extra: list[Any] = ()) -> int:
        """KV bytes the running batch, the prefill and ``extra`` waiting jobs may reach: every row padded to the
        longest worst case."""
        rows, replies, worst, now = 0, 0, 0, 0  # now: the running batch's length, which a joining reply is padded to
        if self.running is not None:
            rows, replies, now = self.running.n_rows, len(self.running.seqs), self.running.length
            worst = max(s.worst_len(now) for s in self.running.seqs)
        if self.prefill is not None:
            rows += sum(s.rows for s in self.prefill.seqs)
            replies += len(self.prefill.seqs)
            worst = max(worst, max(s.worst_len(max(now, s.prompt_width)) for s in self.prefill.seqs))
        for j in extra:
            rows += self.job_rows(j)
            replies += len(j.pairs)
            worst = max(worst, self.job_worst_len(j) + max(0, now - self.job_width(j)))
        return self.kv_bytes(rows, replies, worst)

    def fits_alone(self, job: Any) -> bool:
        return self.job_bytes(job) + self.reserve <= self.e.kv_budget

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> None:
        e = self.e
        while True:
            with e._cond:
                while not (e._queue or self.running or self.prefill) and not e._stopping:
                    self.runner.release()
                    e._cond.wait()
                if e._stopping and not (self.running or self.prefill):
                    self.runner.release()
                    return
                e._drop_cancelled()
                admit, tokens = self._admit(e.max_prefill_tokens) if self.prefill is None else ([], 0)
                e._busy = bool(self.running or self.prefill or admit)
                if admit:
                    self._note_reserved(admit)
            admitted = list(admit)  # every job this iteration admits (a failed step fails them too)
            try:
                self.runner.hold()
                if admit:
                    self._start_prefill(admit)
                if self.prefill is not None:
                    done = self._prefill_step()
                    budget = e.max_prefill_tokens - tokens if admit else 0
                    while done and budget > 0:  # arrivals during that prefill: next groups, in the same budget
                        with e._cond:
                            e._drop_cancelled()
                            more, tokens = self._admit(budget, first_must_fit=True)
                            if more:
                                e._busy = True
                                self._note_reserved(more)
                        if not more:
                            break
                        admitted += more
                        budget -= tokens
                        self._start_prefill(more)
                        done = self._prefill_step()
                if self.running is not None:
                    self._decode()
            except Exception as ex:  # a failed step fails its requests, never the server
                log.exception("decode step failed")
                jobs = {id(s.job): s.job for b in (self.running, self.prefill) if b is not None for s in b.seqs}
                jobs.update({id(j): j for j in admitted})
                for j in jobs.values():
                    j.emit(("error", f"decoding failed: {type(ex).__name__}: {ex}", None))
                self.running = self.prefill = None
                self.runner.release()
            with e._cond:
                if not (self.running or self.prefill):
                    self.runner.release()  # before pending() reads 0: the model is plain again when idle
                e._busy = bool(self.running or self.prefill)
                self._note_reserved()

    def _note_reserved(self, admitted: list[Any] = ()) -> None:
        """Stats: the KV bytes reserved for requests (with ``admitted``, just taken: from the moment they are) and
        what the prompt-prefix cache holds."""
        st = self.e.stats
        st["kv_bytes_reserved"] = self.reserved(list(admitted))
        st["max_kv_bytes_reserved"] = max(st["max_kv_bytes_reserved"], st["kv_bytes_reserved"])
        st["prefix_cache_bytes"] = self.runner.prefix_bytes_held

    def _admit(self, max_tokens: int, first_must_fit: bool = False) -> tuple[list[Any], int]:
        """Oldest waiting jobs whose worst case fits the budget next to what runs (first come, first served), their
        prefill token-rows within ``max_tokens`` (a job over it alone is taken alone, unless ``first_must_fit``);
        and those token-rows (:meth:`prefill_tokens`' estimate)."""
        e = self.e
        cache = self._prefix()
        taken: list[Any] = []
        rows = tokens = 0  # the group's rows and prefill token-rows so far
        for job in e._queue:
            job_rows, job_tokens = self.job_rows(job), self.prefill_tokens(job, cache)
            if taken and rows + job_rows > e.max_batch_rows:
                break
            if (taken or first_must_fit) and tokens + job_tokens > max_tokens:
                break  # the prefill's work memory and its stall of the running replies stay bounded
            over = self.reserved(taken + [job]) + self.reserve > e.kv_budget
            if over and (self.running or self.prefill or taken):
                break
            taken.append(job)
            rows, tokens = rows + job_rows, tokens + job_tokens
        e._queue = e._queue[len(taken):]
        return taken, tokens

    def _start_prefill(self, jobs: list[Any]) -> None:
        from emorl.data import encode_prompts

        ens = self.e.ens
        dev = ens.device
        texts = [j.pairs[0].text for j in jobs]
        enc = encode_prompts(ens.tokenizer, texts, self.e.prompt_limit, False, dev)
        seqs, fork, rows = [], [], []
        for g, job in enumerate(jobs):
            job.results = [None] * len(job.pairs)
            coef, mix = stream_coefs(job.key, list(job.pairs[0].weights), self.n_adapters)
            rows += [g] * coef.shape[0]
            for c, p in enumerate(job.pairs):
                u = uniforms(int(p.seed), p.row + 1, p.max_new_tokens)[p.row] if p.do_sample else None
                seqs.append(Seq(job, c, p, job.key.removesuffix("+base"), coef.to(dev), mix.to(dev), u,
                                prompt_width=int(enc["input_ids"].shape[1])))
                fork.append(g)
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        self.prefill = Prefill(seqs, enc["input_ids"][idx], enc["attention_mask"][idx], fork)
        self.e.stats["jobs"] += len(jobs)
        self.e.stats["pairs"] += len(seqs)

    def _prefill_step(self) -> bool:
        """Run one chunk of the prefill; once its prompt is done, join its replies to the running batch (True)."""
        pf = self.prefill
        assert pf is not None
        chunk = min(self.e.prefill_chunk, max(1, self.e.max_prefill_tokens // pf.rows))  # a lone job over the cap
        if not self.runner.prefill_chunk(pf, chunk):
            return False
        self.prefill = None
        self.e.stats["prefills"] += 1
        batch = self.runner.finish_prefill(pf)
        alive = self._advance(batch.seqs, batch.h)
        batch = batch.filter(alive)
        if batch is not None:
            self.running = batch if self.running is None else self.running.concatenate(batch)
        self._trim()
        self._note()
        return True

    def _decode(self) -> None:
        batch = self.running
        assert batch is not None
        self.runner.step(batch)
        self.e.stats["steps"] += 1
        alive = self._advance(batch.seqs, batch.h)
        self.running = batch.filter(alive)
        if self.running is not batch:  # a retire: the old cache was released
            self._trim()
        self._note()

    def _trim(self) -> None:
        """After a join or a retire: the old cache's freed buffers go back to the system (``trim_freed_memory``)."""
        if trim_freed_memory():
            self.e.stats["trims"] += 1

    def _note(self) -> None:
        st = self.e.stats
        if self.running is not None:
            st["max_running_rows"] = max(st["max_running_rows"], self.running.n_rows)
            st["max_running_jobs"] = max(st["max_running_jobs"], len({id(s.job) for s in self.running.seqs}))

    def _advance(self, seqs: list[Seq], h: torch.Tensor) -> list[Seq]:
        """Sample each reply's next token, report it, finish the replies that end; returns those still alive."""
        e = self.e
        tokens = self.runner.next_tokens(seqs, h)
        alive = []
        for s, tok in zip(seqs, tokens, strict=True):
            s.tokens.append(tok)
            if s.job.stream:
                s.job.emit(("token", s.choice, tok))
            reason = self.runner.ended(s)
            if reason is None and (s.job.cancelled.is_set() or e._cancel_inflight):
                reason = "cancelled"
            if reason is None:
                alive.append(s)
                continue
            s.finish = reason
            res = PairResult(list(s.tokens), self.runner.text(s), reason)
            s.job.results[s.choice] = res
            s.job.emit(("finish", s.choice, res))
            if all(r is not None for r in s.job.results):
                if any(r.finish_reason == "cancelled" for r in s.job.results):
                    e.stats["cancelled"] += 1
                s.job.finished = time.monotonic()
                s.job.emit(("done", None, None))
        return alive

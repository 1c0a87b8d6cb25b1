"""The decode loop: one chunk of (weight point, prompt) pairs decoded step by step, and how big a chunk may be.

Rows of a forward are laid out adapter-major: for a chunk of n (weight point, prompt) pairs, rows
``[i*n:(i+1)*n]`` carry adapter i (the :func:`~emorl.lora_bank` layout), so the K adapters of a step run
as one forward over the shared base. The prompt prefill runs once per adapter on the B prompts; its KV cache is
then forked (row-indexed) for every weight point. Finished rows are dropped from the batch (their cache rows too)
once they are a quarter of it, so early EOS saves work.

Sampling draws one uniform per (point, prompt, step) from a generator seeded by (seed, weight point), so a
point's samples do not depend on which other points or how many rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from emorl.ensemble.mixing import mix_scores
from emorl.ensemble.streams import Head, Stream
from emorl.sampling import choose as _choose
from emorl.sampling import warpers


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


def decode_chunk(stream: Stream, head: Head, bank: Any, spec: DecodeSpec, h0: torch.Tensor, state: dict[str, Any],
                 group0: torch.Tensor, w_pairs: torch.Tensor, streams: int, u: torch.Tensor | None,
                 progress: Any = None, stats: dict[str, Any] | None = None, score_pairs: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode n (point, prompt) pairs from a state of m row groups (streams*m rows, adapter-major; one row per group
    for params).

    Pairs whose prompt and generated prefix are identical share one group — one backbone row per stream — since
    their hidden states are identical whatever their weights; a group splits when its pairs choose different
    tokens. So weight points that agree on a prefix pay for it once (exact: the same computation, done once).
    ``streams``: streams per group (the adapters, plus the base stream when ``spec.anchored``; ignored for params,
    which decodes one merged stream).
    ``group0`` (n,): each pair's initial group (its prompt's row of the prefill); ``w_pairs`` (n, K);
    ``u`` (n, T) uniforms for sampling or None for greedy. Returns token ids (n, T) padded, lengths (n,), and
    the per-step mixed scores (n, T, V) if ``spec.output_scores`` — only of the pairs ``score_pairs`` (indices
    into the n pairs, in that order: (len(score_pairs), T, V)) when given, so a caller that needs a few rows' scores
    (the evaluation's KL) does not hold every row's."""
    n, t_max = w_pairs.shape[0], spec.max_new_tokens
    dev = h0.device
    params = spec.mode == "params"
    width = 1 if params else streams  # backbone rows per group
    out = torch.full((n, t_max), spec.pad, dtype=torch.long, device=dev)
    lengths = torch.full((n,), t_max, dtype=torch.long, device=dev)
    scores_out = None
    slot = None  # pair -> its row of scores_out (-1: not kept)
    if spec.output_scores and score_pairs is not None:
        slot = torch.full((n,), -1, dtype=torch.long, device=dev)
        slot[score_pairs.to(dev)] = torch.arange(len(score_pairs), device=dev)
    procs = spec.processors(dev) if spec.rows is None else None
    eos = torch.tensor(spec.eos, dtype=torch.long, device=dev)
    grp = group0.clone()
    act = torch.arange(n, device=dev)  # the pairs still decoding
    m = h0.shape[0] // width
    w_rows = w_pairs[grp] if params else None  # params: the bank's weights, one row per group (= pair)
    h = h0
    rows_done = syncs = 0
    for t in range(t_max):
        g_act = grp[act]
        sc = mix_scores(spec.mode, h, width, g_act, w_pairs[act], head, spec.anchored)
        if spec.output_scores:
            if scores_out is None:
                kept = n if slot is None else len(score_pairs)
                scores_out = torch.zeros(kept, t_max, sc.shape[-1], dtype=torch.float32, device=dev)
            if slot is None:
                scores_out[act, t] = sc
            else:
                s_act = slot[act]
                sel = s_act >= 0
                scores_out[s_act[sel], t] = sc[sel]
        sc = procs(out[act, :t], sc) if procs is not None else spec.rows.warp(act, out[act, :t], sc)
        nxt = _choose(sc, None if u is None else u[act, t])
        out[act, t] = nxt
        ended = torch.isin(nxt, eos)
        if spec.stop_criteria is not None:
            ended |= spec.stop_criteria(out[act, : t + 1], None).to(dev)
        if spec.rows is not None:
            ended = spec.rows.ended(t, act, nxt, ended)
        lengths[act] = torch.where(ended, t + 1, lengths[act])
        rows_done += width * m
        if progress is not None:
            progress.update(1)
        if t == t_max - 1:
            break
        # regroup: pairs of one group that chose the same token stay together (params: one group per pair, in
        # order). Ended pairs get a key above every group's, so they sort last and drop out.
        cont = ~ended
        vocab = sc.shape[-1]
        key = torch.where(cont, g_act * vocab + nxt, m * vocab)
        uniq, inv = torch.unique(key, return_inverse=True)  # host sync 1: the number of distinct keys
        parent, tok = uniq // vocab, uniq % vocab
        distinct = 1 + (parent[1:] != parent[:-1]).sum()  # parents are sorted: distinct groups still decoding
        n_alive, n_distinct, any_ended = torch.stack([cont.sum(), distinct, ended.any()]).tolist()  # host sync 2
        syncs += 2
        if n_alive == 0:
            if progress is not None:
                progress.update(t_max - 1 - t)
            break
        n_keep = uniq.shape[0] - int(any_ended)  # the ended pairs' key is the last one
        n_distinct -= int(any_ended)
        parent, tok = parent[:n_keep], tok[:n_keep]
        pos = torch.nonzero_static(cont, size=n_alive)[:, 0] if n_alive < len(act) else None
        if pos is not None:
            act, inv = act[pos], inv[pos]
        split = n_keep > n_distinct
        if not split and (m - n_keep) * 4 < m:  # only a few groups died: keep the layout, feed them pads
            feed = torch.full((m,), spec.pad, dtype=torch.long, device=dev)
            feed[parent] = tok
        else:  # new layout: gather the surviving / splitting groups' cache rows
            state = stream.select(state, parent)
            if stats is not None:
                stats["regroups"] = stats.get("regroups", 0) + 1
            grp[act] = inv
            m, feed = n_keep, tok
            if params:
                w_rows = w_rows[parent]
                bank.set_weights(w_rows)
        h = stream.step(feed, state)
    if stats is not None:
        stats["row_steps"] = stats.get("row_steps", 0) + rows_done
        stats["row_steps_unshared"] = stats.get("row_steps_unshared", 0) + int(width * lengths.sum())
        stats["host_syncs"] = stats.get("host_syncs", 0) + syncs  # the loop's own reads of device values
        stats["steps"] = stats.get("steps", 0) + t + 1
    return out, lengths, scores_out


def derive_chunking(budget_bytes: float, per_row_token: float, length: int, vocab: int, streams: int, mode: str,
                    max_rows: int | None) -> int:
    """How many backbone rows fit the memory budget: KV cache (+ its per-step copy) and the step's logits (one
    vocabulary row per pair, shared by its ``streams`` rows, unless the mode takes every stream's logits)."""
    per_row = 2.5 * per_row_token * length + 4.0 * vocab * (3 if mode in ("logits", "probs") else 1.0 / streams)
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

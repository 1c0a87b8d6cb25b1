"""Language-model likelihood rewards: ``fluency`` (the frozen base model, adapters disabled) and ``perplexity``
(any causal LM, e.g. GPT-2 as in the paper).

Both compute the mean token negative log-likelihood (NLL) of the reply and map perplexity ``ppl = exp(NLL)``
to [0, 1]. The default map is ``ppl0 / (ppl0 + ppl)`` (= ``sigmoid(ln ppl0 - NLL)``): monotone, smooth, 0.5 at
``ppl = ppl0``, never exactly 0 or 1, so RL always sees a gradient. ``map: linear`` gives the paper's
``(scale - ppl) / scale`` clipped to [0, 1], which is flat (0) for every ``ppl >= scale``.

Batches are sorted by length, left-padded (with explicit position ids, so padding changes nothing) and
micro-batched; only the logits of the last ``max reply length + 1`` positions are materialised. A prefix shared
by every prompt (the chat template's system prompt) is run once and its KV cache reused.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emorl.models import cache_kwarg, output_cache, position_ids
from emorl.rewards.base import Options, RewardError, empty, load_pretrained, placement, positive, register_reward

if TYPE_CHECKING:
    from emorl.models import Base


def nll_to_score(nll: np.ndarray, mapping: str = "ratio", ppl0: float = 20.0, scale: float = 50.0) -> np.ndarray:
    """Map mean token NLL to [0, 1]: ``ratio`` = ppl0 / (ppl0 + ppl); ``linear`` = clip((scale - ppl) / scale)."""
    nll = np.asarray(nll, dtype=np.float64)
    if mapping == "ratio":
        return 1.0 / (1.0 + np.exp(np.clip(nll - math.log(ppl0), -700, 700)))
    ppl = np.exp(np.clip(nll, -700, 700))
    return np.clip((scale - ppl) / scale, 0.0, 1.0)


def _accepts(model: Any, arg: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return arg in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _common_prefix(rows: list[tuple[list[int], list[int]]]) -> int:
    """Length of the token prefix shared by every context, leaving each at least one token of its own (the
    last context token's logits predict the first reply token)."""
    ctxs = [c for c, _ in rows]
    n = min(len(c) for c in ctxs) - 1
    first = ctxs[0]
    for c in ctxs[1:]:
        k = 0
        while k < n and c[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def causal_nll(model: Any, contexts: list[list[int]], targets: list[list[int]], pad_id: int,
               device: torch.device | str, micro_batch: int = 16, max_len: int | None = None,
               share_prefix: bool = True, min_prefix: int = 8) -> np.ndarray:
    """Mean NLL of each ``targets[i]`` given ``contexts[i]`` under a causal LM (NaN where a target is empty).

    A row with no context uses its first target token as context (nothing predicts it). With ``share_prefix``,
    a token prefix common to every context (a chat template's system prompt) is run once and its KV cache
    reused by every micro-batch."""
    rows: list[tuple[list[int], list[int]]] = []
    for c, t in zip(contexts, targets, strict=True):
        c, t = list(c), list(t)
        if not c:
            c, t = t[:1], t[1:]
        if max_len is not None and len(c) + len(t) > max_len:
            t = t[: max_len - 1]
            c = c[-(max_len - len(t)):]
        rows.append((c, t))
    out = np.full(len(rows), np.nan)
    todo = [i for i, (_, t) in enumerate(rows) if t]
    if not todo:
        return out
    todo.sort(key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    keep_arg = _accepts(model, "logits_to_keep")
    plen = _common_prefix([rows[i] for i in todo]) if share_prefix else 0
    prefix_cache = None
    if plen >= min_prefix:
        pout = model(input_ids=torch.tensor([rows[todo[0]][0][:plen]], device=device), use_cache=True)
        prefix_cache = output_cache(pout)
    if prefix_cache is None or not hasattr(prefix_cache, "batch_repeat_interleave"):  # short prefix, legacy cache
        prefix_cache, plen = None, 0
    for s in range(0, len(todo), micro_batch):
        idx = todo[s: s + micro_batch]
        seqs = [rows[i][0][plen:] + rows[i][1] for i in idx]
        tlen = [len(rows[i][1]) for i in idx]
        T, L = max(map(len, seqs)), max(tlen)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, T - len(q):] = torch.tensor(q)
            mask[r, T - len(q):] = 1
        pos = plen + position_ids(mask)
        kw: dict[str, Any] = {"input_ids": ids.to(device), "position_ids": pos.to(device)}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            kw[cache_kwarg(model)] = cache
            kw["attention_mask"] = torch.cat([torch.ones((len(idx), plen), dtype=torch.long), mask], -1).to(device)
            kw["use_cache"] = True
        else:
            kw["attention_mask"] = mask.to(device)
            kw["use_cache"] = False
        if keep_arg:
            kw["logits_to_keep"] = L + 1
        logits = model(**kw).logits[:, -(L + 1):-1].float()  # position j predicts token j + 1
        labels = ids[:, T - L:].clone()
        for r, n in enumerate(tlen):
            labels[r, : L - n] = -100
        out[idx] = _mean_nll(logits, labels)
    return out


def _mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Mean NLL per row over the labelled positions (label -100 = not scored): both NLL paths end here."""
    labels = labels.to(logits.device)
    tok_nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                reduction="none", ignore_index=-100).view(labels.shape)
    valid = (labels != -100).float()
    return ((tok_nll * valid).sum(-1) / valid.sum(-1)).cpu().numpy()


def seq2seq_nll(model: Any, sources: list[list[int]], targets: list[list[int]], pad_id: int,
                device: torch.device | str, micro_batch: int = 16) -> np.ndarray:
    """Mean NLL of each ``targets[i]`` as the decoder output for encoder input ``sources[i]`` (NaN if empty)."""
    out = np.full(len(targets), np.nan)
    todo = sorted((i for i, t in enumerate(targets) if t), key=lambda i: len(sources[i]) + len(targets[i]))
    for s in range(0, len(todo), micro_batch):
        idx = todo[s: s + micro_batch]
        S = max(max(len(sources[i]) for i in idx), 1)
        L = max(len(targets[i]) for i in idx)
        ids = torch.full((len(idx), S), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), S), dtype=torch.long)
        labels = torch.full((len(idx), L), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(sources[i])] = torch.tensor(sources[i], dtype=torch.long)
            mask[r, : len(sources[i])] = 1
            labels[r, : len(targets[i])] = torch.tensor(targets[i])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                       use_cache=False).logits.float()
        out[idx] = _mean_nll(logits, labels)
    return out


class _LikelihoodReward:
    """Shared options of the likelihood rewards: the NLL -> [0, 1] map and micro-batching."""

    def __init__(self, name: str, opts: Options):
        self.name = name
        self.ppl0 = opts.get("ppl0", 20.0, float, check=positive, expect="a perplexity > 0")
        scale = opts.get("scale", None, float, check=positive, expect="a perplexity > 0")
        self.map = opts.get("map", "linear" if scale is not None else "ratio", str, choices=("ratio", "linear"))
        self.scale = scale if scale is not None else 50.0
        self.micro_batch = opts.get("micro_batch", 16, int, check=positive, expect="an integer >= 1")

    def _finish(self, nll: np.ndarray, responses: list[str]) -> np.ndarray:
        scores = nll_to_score(nll, self.map, self.ppl0, self.scale)
        scores[np.isnan(nll) | empty(responses)] = 0.0
        return scores


@register_reward("fluency")
class Fluency(_LikelihoodReward):
    """Likelihood of the reply under the frozen base model (adapters disabled, no second copy), conditioned
    on the prompt exactly as the policy sees it (chat template and system prompt); only reply tokens count."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        super().__init__(name, opts)
        self.max_reply_tokens = opts.get("max_reply_tokens", 256, int, check=positive, expect="an integer >= 1")
        self.share_prefix = opts.get("share_prefix", True, bool)
        if base is None:
            raise RewardError(f"objectives.{name}.type: reward type 'fluency' scores replies under the base model; "
                              f"build it with build_reward(..., base=load_base(...)), or use type 'perplexity' with "
                              f"`model: <causal LM path or id>`")
        self.base = base

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        from emorl.data import format_prompts
        from emorl.models import adapters_disabled
        from emorl.utils import eval_mode

        b = self.base
        tok = b.tokenizer
        texts = format_prompts(tok, list(prompts), b.is_seq2seq, b.config.system_prompt)
        ctx = tok(texts, add_special_tokens=b.is_seq2seq)["input_ids"]
        ctx = [c[-b.config.max_prompt_tokens:] for c in ctx]
        tgt = [t[: self.max_reply_tokens] for t in tok(list(responses), add_special_tokens=False)["input_ids"]]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        model = b.model
        with adapters_disabled(model), eval_mode(model):
            if b.is_seq2seq:
                nll = seq2seq_nll(model, ctx, tgt, pad, b.device, self.micro_batch)
            else:
                nll = causal_nll(model, ctx, tgt, pad, b.device, self.micro_batch, share_prefix=self.share_prefix)
        return self._finish(nll, list(responses))


@register_reward("perplexity")
class Perplexity(_LikelihoodReward):
    """Perplexity of the reply under any causal LM (GPT-2 for paper fidelity).

    ``include_prompt: false`` (default): the reply alone, after the tokenizer's BOS token if it has one.
    ``include_prompt: true``: as the paper, the statement and reply concatenated with no separator and every
    token but the first scored (so the prompt's own perplexity counts too)."""

    def __init__(self, name: str, opts: Options, base: Base | None = None):
        super().__init__(name, opts)
        self.path = opts.get("model", kind=str, check=bool, expect="a model path or hub id")
        self.include_prompt = opts.get("include_prompt", False, bool)
        self.max_tokens = opts.get("max_tokens", 512, int, check=lambda x: x >= 2, expect="an integer >= 2")
        self.device, self.dtype = placement(opts, base)
        self.model: Any = None
        self.tok: Any = None

    def load(self) -> None:
        if self.model is None:
            self.model, self.tok = load_pretrained("causal LM", "AutoModelForCausalLM", self.path, self.device,
                                                   self.dtype, f"objectives.{self.name}")

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        self.load()
        tok = self.tok
        rep = tok(list(responses), add_special_tokens=False)["input_ids"]
        if self.include_prompt:
            pro = tok(list(prompts), add_special_tokens=False)["input_ids"]
            seqs = [p + r for p, r in zip(pro, rep, strict=True)]
            ctx, tgt = [s[:1] for s in seqs], [s[1:] for s in seqs]
        else:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            ctx, tgt = [list(bos) for _ in rep], rep
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        nll = causal_nll(self.model, ctx, tgt, pad, self.device, self.micro_batch, self.max_tokens)
        return self._finish(nll, list(responses))

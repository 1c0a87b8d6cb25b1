"""KL to the base model per method, per token, on the test replies (``eval.kl``): how far each method's sampling
distribution moved from the base's, the x-axis on which reward over-optimisation shows (Gao et al. 2023).

For each method and seed the test replies are decoded again with the evaluation's seed (common random numbers, so the
same tokens; the share reproduced is recorded) and ``output_scores=True``, which gives the method's next-token scores
before the sampling warpers (for a mix: the mixed scores). At every generated position t of a reply::

    KL_t = sum_v q_t(v) (log q_t(v) - log p_t(v))

where ``q_t`` is the distribution the method sampled from (its scores after temperature, top-k and top-p, exactly
the warpers the decoder used; greedy decoding: the softmax of the scores) and ``p_t`` is the base model's
distribution at the same temperature, untruncated, on the same prefix (adapters disabled, one teacher-forced
forward). A reply's value is the mean of KL_t over its generated tokens (EOS included). The base's own row is not 0
under top-k/top-p: it is what truncation alone costs (-log of the kept mass); methods compare by their distance to
it. The reference is untruncated because a truncated base would give an infinite KL to any method whose kept set
differs by one token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emorl.config import GenerationConfig, RunConfig
from emorl.metrics import summarise
from emorl.stats import bootstrap_ci
from emorl.utils import atomic_write_text

log = logging.getLogger("emorl.kl")
KL_VERSION = 1


def sampled_logprobs(scores: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """log q: the sampled distribution of scores (N, V) after ``gen``'s warpers (-inf where truncated)."""
    from emorl.sampling import warpers

    x = scores.float()
    if gen.do_sample:
        dummy = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
        for p in warpers(gen.temperature, gen.top_k, gen.top_p):
            x = p(dummy, x)
    return torch.log_softmax(x, dim=-1)


def reference_logprobs(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """log p: the base's distribution at the sampling temperature, untruncated."""
    t = gen.temperature if gen.do_sample and gen.temperature else 1.0
    return torch.log_softmax(logits.float() / t, dim=-1)


def token_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per row of (N, V) log-probabilities (terms with q = 0 count 0)."""
    q = logq.exp()
    terms = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q))
    return terms.sum(-1).clamp(min=0.0)


@torch.inference_mode()
def base_logits(base: Any, prompts: Sequence[str], tokens: torch.Tensor, micro_batch: int = 8) -> torch.Tensor:
    """The base model's logits (B, T, V) for each generated position of ``tokens`` (B, T), teacher-forced on the
    evaluation's formatted prompts, adapters disabled."""
    from emorl.models import adapters_disabled, position_ids
    from emorl.prompts import encode_prompts, format_prompts
    from emorl.utils import eval_mode

    tok = base.tokenizer
    texts = format_prompts(tok, list(prompts), base.is_seq2seq, base.config.system_prompt)
    enc = encode_prompts(tok, texts, base.config.max_prompt_tokens, base.is_seq2seq, base.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokens = tokens.to(base.device)
    T = tokens.shape[1]
    out = []
    model = base.model
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with adapters_disabled(model), eval_mode(model):
        for s in range(0, len(prompts), micro_batch):
            sl = slice(s, s + micro_batch)
            if base.is_seq2seq:
                start = getattr(lm.config, "decoder_start_token_id", None)
                start = tok.pad_token_id if start is None else start
                dec = torch.cat([torch.full((tokens[sl].shape[0], 1), start, device=tokens.device),
                                 tokens[sl, :-1]], 1)
                logits = model(input_ids=ids[sl], attention_mask=mask[sl], decoder_input_ids=dec).logits
            else:
                full = torch.cat([ids[sl], tokens[sl]], 1)
                m = torch.cat([mask[sl], torch.ones_like(tokens[sl])], 1)
                logits = model(input_ids=full, attention_mask=m, position_ids=position_ids(m)).logits[:, -T - 1:-1]
            out.append(logits.float().cpu())
    return torch.cat(out, 0)


def method_kl(decoder: Any, spec: Any, prompts: Sequence[str], seed: int, gen: GenerationConfig,
              replies: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """Per-reply mean per-token KL(method's sampled distribution || base) for one seed, and how many of
    ``replies`` (the evaluated ones) the re-decode reproduced."""
    res = decoder.result(spec, list(prompts), seed, output_scores=True)
    scores = res.scores[0] if res.scores.dim() == 4 else res.scores  # (B, T, V)
    tokens, lengths = res.token_ids, res.lengths
    ref = base_logits(decoder.base, prompts, tokens)
    T = min(scores.shape[1], ref.shape[1])
    values = np.zeros(len(prompts))
    for b in range(len(prompts)):
        n = int(lengths[b])
        if n == 0:
            continue
        n = min(n, T)
        kl = token_kl(sampled_logprobs(scores[b, :n], gen), reference_logprobs(ref[b, :n], gen))
        values[b] = float(kl.mean())
    same = sum(a == b for a, b in zip(res.texts, replies, strict=True)) if replies is not None else len(prompts)
    return values, int(same)


def kl_signature(m: dict[str, Any], n: int | None = None) -> str:
    return f"{KL_VERSION}:{m.get('signature')}:{n}"


def add_kl(run: str | Path, results: dict[str, Any], cfg: RunConfig, specs: Sequence[Any], base: Any = None,
           base_adapter: dict[str, Path] | None = None, decoder: Any = None) -> dict[str, Any]:
    """With ``eval.kl``: each method's per-reply KL into its reply rows (``"kl"``), ``kl_per_token`` into its per-seed
    metrics and summary, and ``kl_reproduced`` (replies the re-decode matched / all). Reused while the method's decode
    signature is unchanged; routed methods (per-prompt weights) are skipped."""
    from emorl.utils import read_jsonl

    run = Path(run)
    methods = results["methods"]
    if not cfg.eval.kl:
        for m in methods.values():
            _strip(m)
        return results
    by_name = {s.name: s for s in specs}
    todo = [n for n, m in methods.items() if n in by_name and not m.get("same_as")
            and by_name[n].kind != "routed" and m.get("kl_signature") != kl_signature(m, cfg.eval.kl_prompts)]
    if todo and decoder is None:
        from emorl.decoding import Decoder

        if base is None:
            from emorl.models import load_base

            base = load_base(cfg.model)
        decoder = Decoder(base, cfg.eval.generation, base_adapter)
    for name in todo:
        m = methods[name]
        path = run / "eval" / "replies" / f"{name}.jsonl"
        rows = read_jsonl(path)
        seeds = sorted({int(r["seed"]) for r in rows})
        same = 0
        for r in rows:
            r.pop("kl", None)
        for d in m["per_seed"]:
            seed = int(d["seed"])
            if seed not in seeds:
                continue
            seed_rows = [r for r in rows if int(r["seed"]) == seed][: cfg.eval.kl_prompts or None]
            prompts = [r["prompt"] for r in seed_rows]
            log.info("KL to the base: %s, seed %d", name, seed)
            values, ok = method_kl(decoder, by_name[name], prompts, seed, cfg.eval.generation,
                                   [r["reply"] for r in seed_rows])
            same += ok
            for r, v in zip(seed_rows, values, strict=True):
                r["kl"] = float(v)
            d["kl_per_token"] = float(values.mean())
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        m["summary"] = summarise([{k: v for k, v in d.items() if k != "seed"} for d in m["per_seed"]])
        values = [r["kl"] for r in rows if "kl" in r]
        m["summary"]["kl_per_token"]["ci95"] = bootstrap_ci(values)  # prompts resampled (one seed: one unit each)
        m["kl_reproduced"] = [same, len(values)]
        m["kl_signature"] = kl_signature(m, cfg.eval.kl_prompts)
        if same < len(values):  # eval.kl_prompts: only the first few replies per seed are re-decoded
            log.warning("%s: the re-decode reproduced %d of the %d re-decoded replies; the KL is that of the "
                        "re-decoded replies", name, same, len(values))
    for m in methods.values():
        twin = m.get("same_as")
        if twin and twin in methods and "kl_signature" in methods[twin]:
            m["per_seed"], m["summary"] = methods[twin]["per_seed"], methods[twin]["summary"]
            m["kl_reproduced"] = methods[twin].get("kl_reproduced")
    return results


def _strip(m: dict[str, Any]) -> None:
    if "kl_signature" not in m:
        return
    for d in m.get("per_seed", []):
        d.pop("kl_per_token", None)
    m.get("summary", {}).pop("kl_per_token", None)
    m.pop("kl_signature", None)
    m.pop("kl_reproduced", None)

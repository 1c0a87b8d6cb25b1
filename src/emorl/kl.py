"""KL to the base model per method, per token, on the test replies (``eval.kl``): how far each method's sampling
distribution moved from the base's, the x-axis on which reward over-optimisation shows (Gao et al. 2023).

The evaluation measures it in its own decode: the first ``eval.kl_prompts`` rows of each method's decode keep their
next-token scores before the sampling warpers (``output_scores=n``; for a mix: the mixed scores), so the KL costs one
teacher-forced base forward, not a second decode (:meth:`emorl.decoding.Decoder.decode_finish`). A run evaluated
without it (``eval.kl`` switched on later, another ``kl_prompts``) gets it from :func:`add_kl`, which decodes those
rows again with the evaluation's seed (common random numbers, so the same tokens; the share reproduced is
recorded). The math is :mod:`emorl.divergence`. At every generated position t of a reply::

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

from emorl.config import GenerationConfig, RunConfig
from emorl.divergence import reply_kl
from emorl.metrics import summarise
from emorl.stats import bootstrap_ci
from emorl.utils import atomic_write_text

log = logging.getLogger("emorl.kl")
KL_VERSION = 1


def method_kl(decoder: Any, spec: Any, prompts: Sequence[str], seed: int, gen: GenerationConfig,
              replies: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """Per-reply mean per-token KL(method's sampled distribution || base) for one seed, re-decoded, and how many
    of ``replies`` (the evaluated ones) the re-decode reproduced. The evaluation itself takes the KL from its own
    decode (:meth:`emorl.decoding.Decoder.decode_finish` with ``kl_rows``); this re-decode serves runs evaluated
    without it."""
    res = decoder.result(spec, list(prompts), seed, output_scores=True)
    values = reply_kl(decoder.base, res, prompts, gen)
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
        values = record_kl(m, rows, cfg, same)
        if same < len(values):  # eval.kl_prompts: only the first few replies per seed are re-decoded
            log.warning("%s: the re-decode reproduced %d of the %d re-decoded replies; the KL is that of the "
                        "re-decoded replies", name, same, len(values))
    for name, m in methods.items():  # measured in the evaluation's own decode, or a summary the judges rebuilt since:
        # the KL's CI (and kl_reproduced) from the reply rows
        kl_sum = m.get("summary", {}).get("kl_per_token")
        if name not in todo and not m.get("same_as") and kl_sum is not None and "ci95" not in kl_sum:
            rows = read_jsonl(run / "eval" / "replies" / f"{name}.jsonl")
            record_kl(m, rows, cfg, (m.get("kl_reproduced") or [None])[0])
    for m in methods.values():
        twin = m.get("same_as")
        if twin and twin in methods and "kl_signature" in methods[twin]:
            m["per_seed"], m["summary"] = methods[twin]["per_seed"], methods[twin]["summary"]
            m["kl_reproduced"] = methods[twin].get("kl_reproduced")
    return results


def record_kl(m: dict[str, Any], rows: list[dict[str, Any]], cfg: RunConfig, reproduced: int | None = None
              ) -> list[float]:
    """A method's KL fields once its reply ``rows`` carry ``"kl"`` and its per-seed metrics ``kl_per_token``: the
    summary with the KL's CI, ``kl_reproduced`` (replies the KL was measured on that are the evaluated ones; all of
    them when measured in the evaluation's own decode) and ``kl_signature``. Returns the reply values. Called by
    :func:`add_kl` only, after the judges (which rebuild the summary)."""
    m["summary"] = summarise([{k: v for k, v in d.items() if k != "seed"} for d in m["per_seed"]])
    values = [r["kl"] for r in rows if "kl" in r]
    m["summary"]["kl_per_token"]["ci95"] = bootstrap_ci(values)  # prompts resampled (one seed: one unit each)
    m["kl_reproduced"] = [len(values) if reproduced is None else reproduced, len(values)]
    m["kl_signature"] = kl_signature(m, cfg.eval.kl_prompts)
    return values


def kl_rows(cfg: RunConfig, n_prompts: int) -> int:
    """How many replies per seed the evaluation measures the KL on (``eval.kl_prompts``, all when unset; 0 without
    ``eval.kl``)."""
    return min(cfg.eval.kl_prompts or n_prompts, n_prompts) if cfg.eval.kl else 0


def _strip(m: dict[str, Any]) -> None:
    if "kl_signature" not in m:
        return
    for d in m.get("per_seed", []):
        d.pop("kl_per_token", None)
    m.get("summary", {}).pop("kl_per_token", None)
    m.pop("kl_signature", None)
    m.pop("kl_reproduced", None)

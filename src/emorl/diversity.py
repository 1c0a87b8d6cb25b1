"""Diversity-2 under the other decoding (``eval.greedy_diversity``): every method decoded greedily on the test prompts
once more, so the report can show Diversity-2 both ways (across replies, Li et al. 2016; per reply, the EMORL
reference code's form, :mod:`emorl.metrics`) under sampled *and* greedy decoding. The paper evaluated EMORL greedily
and the baselines by sampling and used the per-reply form; this separates what the decoding and the formula each do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emorl.config import GenerationConfig, RunConfig
from emorl.metrics import distinct_n, diversity_reference

log = logging.getLogger("emorl.diversity")


def greedy_config(cfg: RunConfig) -> GenerationConfig:
    """The evaluation's generation settings with sampling off."""
    g = cfg.eval.generation
    return GenerationConfig(**{**{k: getattr(g, k) for k in g.__dataclass_fields__}, "do_sample": False})


def diversity(replies: Sequence[str]) -> dict[str, float]:
    return {"diversity2": distinct_n(replies, 2), "diversity2_ref": diversity_reference(replies, 2)}


def add_greedy_diversity(run: str | Path, results: dict[str, Any], cfg: RunConfig, specs: Sequence[Any],
                         prompts: Sequence[str], base: Any = None, base_adapter: dict[str, Path] | None = None,
                         decoder: Any = None) -> dict[str, Any]:
    """``methods[m]["greedy"] = {diversity2, diversity2_ref, length_tokens, sampled: {...}}`` for every method (routed
    ones skipped); when the evaluation itself is greedy, its own replies are used. Reused while unchanged."""
    methods = results["methods"]
    if not getattr(cfg.eval, "greedy_diversity", False):
        for m in methods.values():
            m.pop("greedy", None)
        return results
    gen = greedy_config(cfg)
    by_name = {s.name: s for s in specs}
    for name, m in methods.items():
        spec = by_name.get(name)
        if spec is None or spec.kind == "routed":
            continue
        key = hashlib.sha256(json.dumps([m.get("signature"), list(prompts)]).encode()).hexdigest()[:16]
        if (m.get("greedy") or {}).get("key") == key:
            continue
        s = m["summary"]
        sampled = {k: s[k]["mean"] for k in ("diversity2", "diversity2_ref", "length_tokens") if k in s}
        if not cfg.eval.generation.do_sample:
            m["greedy"] = {**sampled, "sampled": None, "key": key}
            continue
        if decoder is None:
            from emorl.decoding import Decoder

            if base is None:
                from emorl.models import load_base

                base = load_base(cfg.model)
            decoder = Decoder(base, gen, base_adapter)
        log.info("greedy decode for Diversity-2: %s", name)
        texts, lengths = decoder.decode(spec, list(prompts), 0)
        m["greedy"] = {**diversity(texts), "length_tokens": sum(lengths) / max(len(lengths), 1), "sampled": sampled,
                       "key": key}
    return results

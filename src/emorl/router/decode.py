"""Decoding with per-prompt weights: prompts that share their weights are decoded together in one ``generate``.

Sampling draws its uniforms by a prompt's position in the call, so a routed prompt does not share its random
numbers with the same prompt decoded in a full batch by another method (the comparison in
:mod:`emorl.router.compare` decodes every method inside the router's groups, so there it does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emorl.utils import EmorlError


def groups(weights: np.ndarray, decimals: int = 9) -> list[tuple[np.ndarray, list[int]]]:
    """[(weight vector, prompt indices)] for the distinct rows of ``weights``, in order of first appearance."""
    out: dict[tuple[float, ...], list[int]] = {}
    for i, w in enumerate(np.round(np.asarray(weights, dtype=np.float64), decimals)):
        out.setdefault(tuple(w.tolist()), []).append(i)
    return [(np.array(k), v) for k, v in out.items()]


def decode_routed(ens: Any, prompts: list[str], weights: np.ndarray, *, mode: str = "hidden", seed: int = 0,
                  anchor: str = "base", **gen: Any) -> tuple[list[str], list[int]]:
    """Replies and token counts, in prompt order, each prompt decoded with its own row of ``weights`` (B×K), by the
    router's rule: base-anchored (its points lie in the anchored search's box)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(prompts), ens.k):
        raise EmorlError(f"per-prompt weights: expected shape ({len(prompts)}, {ens.k}), got {weights.shape}")
    texts: list[str] = [""] * len(prompts)
    lengths = [0] * len(prompts)
    for w, idx in groups(weights):
        res = ens.generate([prompts[i] for i in idx], w, mode=mode, seed=seed, anchor=anchor, **gen)
        for j, i in enumerate(idx):
            texts[i] = res.texts[j]
            lengths[i] = int(res.lengths[j])
    return texts, lengths


def route(run: str | Path, ens: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(weights B×K, fallback mask, router meta) for ``prompts`` with the router of ``run``, checked against the
    ensemble's adapters."""
    from emorl.router.store import embed, load_router, router_dir, run_adapters

    router, meta = load_router(router_dir(run), run_adapters(run, list(ens.names)))
    if list(router.names) != list(ens.names):
        raise EmorlError(f"the router of {run} mixes {router.names}, the ensemble has {ens.names}")
    w, far = router.predict(embed(prompts, str(ens.device)))
    return w, far, meta

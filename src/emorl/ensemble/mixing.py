"""The mixing rules and their weights: which weights a point may have, how they are rescaled, and how the K
streams' next-token scores are combined.

Per step, from the K adapters' last hidden states h_k (after the final norm), the base stream's h_0 (adapters off:
one more row group of the same forward, the LoRA bank's zero slot) and weights w:

* ``hidden``  (EMORL): logits = head(h_0 + sum_k w_k (h_k - h_0))   — head = the shared LM head with its scaling
* ``logits``  (MOD):   scores = ls_0 + sum_k w_k (ls_k - ls_0),  ls = log_softmax(head(h))
* ``probs``:           scores = log sum_k w_k softmax(head(h_k))    (a mixture: always convex, scale invariant)
* ``params``  (model soups): one stream whose LoRA layers apply W0 + sum_k w_k ΔW_k (the bank's weighted mode)

The one weight rule (:func:`weight_rule`): with ``anchor="base"`` the weights are used as given, each adapter's
shift of the base at strength w_k (w = 0 is the base itself; params is then task arithmetic); with
``anchor="none"`` every point is rescaled to sum 1 (the paper's convex hidden mix, the parameter *average*), so
only its direction matters. The two agree wherever sum(w) = 1, and the base stream is only decoded when some point
needs it. The mixed form is computed as (1 - sum w) x_0 + sum_k w_k x_k, so a one-hot point is exactly its
adapter and w = 0 exactly the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emorl.utils import EmorlError

if TYPE_CHECKING:
    from emorl.ensemble.streams import Head

MODES = ("hidden", "logits", "probs", "params")
ANCHORS = ("base", "none")


def weight_rule(mode: str, anchor: str) -> str:
    """``"anchored"`` (weights used as given, relative to the base) or ``"convex"`` (each point rescaled to sum 1).

    ``probs`` is a mixture of distributions, invariant to the weights' scale: always convex."""
    if anchor not in ANCHORS:
        raise EmorlError(f"anchor={anchor!r}: choose 'base' (h0 + sum w_k (h_k - h0)) or 'none' (the convex mix)")
    if mode not in MODES:
        raise EmorlError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    return "convex" if mode == "probs" or anchor == "none" else "anchored"


def is_scale_invariant(mode: str, anchor: str) -> bool:
    """Whether w and c*w (c > 0) decode the same replies, greedy or sampled: true exactly for convex points."""
    return weight_rule(mode, anchor) == "convex"


# ------------------------------------------------------------------------------------------------ weights

def check_weights(weights: Any, n_adapters: int, normalize: bool = False, names: list[str] | None = None,
                  allow_zero: bool = False) -> tuple[np.ndarray, bool]:
    """Validate mixing weights before any work: a K-vector or a G×K matrix, finite, >= 0, no all-zero point
    (unless ``allow_zero``: an anchored point w = 0 is the base model).

    Returns (G×K float64 array, whether a single vector was given). ``normalize`` rescales each point to sum 1
    (the convex rule)."""
    label = f" ({', '.join(names)})" if names else ""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise EmorlError(f"weights: expected numbers, one per adapter{label}; got {weights!r}") from e
    single = w.ndim == 1
    if single:
        w = w[None, :]
    if w.ndim != 2 or w.shape[0] == 0:
        raise EmorlError(f"weights: expected a vector of {n_adapters} or a G×{n_adapters} matrix, got shape "
                         f"{np.shape(weights)}")
    if w.shape[1] != n_adapters:
        raise EmorlError(f"weights: each point needs {n_adapters} weights, one per adapter{label}; got {w.shape[1]}")
    for g, row in enumerate(w):
        where = "weights" if single else f"weights[{g}]"
        if not np.isfinite(row).all():
            raise EmorlError(f"{where} = {row.tolist()}: NaN or infinite weight")
        if (row < 0).any():
            raise EmorlError(f"{where} = {row.tolist()}: weights must be >= 0")
        if not (row > 0).any() and not allow_zero:
            raise EmorlError(f"{where} is all zero: that point is degenerate (no adapter contributes); give at "
                             f"least one positive weight")
    if normalize:
        w = w / w.sum(axis=1, keepdims=True)
    return w, single


# ------------------------------------------------------------------------------------------------ scores

def mix_scores(mode: str, h: torch.Tensor, streams: int, rows: torch.Tensor, w: torch.Tensor, head: Head,
               anchored: bool = False) -> torch.Tensor:
    """Next-token scores (a, V) of ``a`` pairs. ``h`` (streams*m, H): hidden states of m row groups, stream-major
    (``streams`` streams: the adapters, then the base stream if ``anchored``); ``rows`` (a,): each pair's group;
    ``w`` (a, K): each pair's adapter weights (unused for ``params``, where streams = 1). Anchored:
    (1 - sum w) x_0 + sum w_k x_k."""
    hk = h.view(streams, -1, h.shape[-1])
    if mode == "params":
        return head(hk[0, rows])
    wt = w.t().to(torch.float32)[:, :, None]  # (K, a, 1)
    if anchored:
        wt = torch.cat([wt, 1.0 - wt.sum(0, keepdim=True)])  # the base stream's weight
    if mode == "hidden":
        return head((hk[:, rows].to(torch.float32) * wt).sum(0))
    ls = torch.log_softmax(head(h), dim=-1).view(streams, hk.shape[1], -1)[:, rows]  # head once per group, then gather
    if mode == "logits":
        return (ls * wt).sum(0)
    return torch.logsumexp(ls + torch.log(wt), dim=0)  # probs: log sum_k w_k p_k

"""KV-cache helpers that hide a transformers renaming (``past_key_values`` -> ``cache`` in 5.x), and position
ids of left-padded rows."""

from __future__ import annotations

from typing import Any

import torch


def cache_kwarg(module: Any) -> str:
    """The KV-cache argument of ``module.forward``: transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, under either name."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0; they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)

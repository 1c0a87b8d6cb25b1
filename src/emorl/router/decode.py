"""Per-prompt weights from a run's router; :func:`emorl.decoding.decode_routed` decodes with them (the router
computes, decoding below it only takes the weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emorl.utils import EmorlError


def route_weights(run: str | Path, names: list[str], prompts: list[str], device: str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(weights B×K, fallback mask, router meta) for ``prompts`` with the router of ``run``, checked against the
    adapters ``names`` that will be mixed (embedding on ``device``)."""
    from emorl.router.store import embed, load_router, router_dir, run_adapters

    router, meta = load_router(router_dir(run), run_adapters(run, list(names)))
    if list(router.names) != list(names):
        raise EmorlError(f"the router of {run} mixes {router.names}, the ensemble has {list(names)}")
    w, far = router.predict(embed(prompts, device))
    return w, far, meta


def route(run: str | Path, ens: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`route_weights` for the adapters and device of the ensemble ``ens``."""
    return route_weights(run, list(ens.names), prompts, str(ens.device))

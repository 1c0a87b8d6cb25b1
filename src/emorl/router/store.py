"""The router on disk: ``RUN/router/router.json`` (version, method, settings, adapter identities, fit report) and
``router.safetensors`` (embeddings, best points, lattice, ridge coefficients). No pickle: a router handed over by
someone else loads as numbers and JSON only. A router fitted on other adapters, or of an unknown file version, is
refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emorl.router.fit import Router
from emorl.utils import EmorlError, atomic_write_bytes, atomic_write_json

ROUTER_VERSION = 2  # 2: base-anchored weights in [0, w_max]^K (1: convex weights on the simplex)


def router_dir(run: str | Path) -> Path:
    return Path(run) / "router"


def save_router(folder: str | Path, router: Router, *, adapters: dict[str, str], settings: dict[str, Any],
                prompts: list[str]) -> None:
    from safetensors.numpy import save

    folder = Path(folder)
    t = {"emb": router.emb, "best": router.best, "points": router.points, "global_weights": router.global_weights}
    if router.coef is not None:
        t |= {"coef": router.coef, "intercept": router.intercept}
    atomic_write_bytes(folder / "router.safetensors", save({k: np.ascontiguousarray(v, dtype=np.float64)
                                                            for k, v in t.items()}))
    atomic_write_json(folder / "router.json", {
        "version": ROUTER_VERSION, "names": router.names, "method": router.method, "k": router.k,
        "threshold": router.threshold, "global_weights": router.global_weights.tolist(), "adapters": adapters,
        "settings": settings, "prompts": prompts, "fit": router.info})


def read_meta(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / "router.json"
    if not p.exists():
        raise EmorlError(f"no router in {folder} ({p.name} missing); fit one with `emorl route --run RUN`")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EmorlError(f"{p}: corrupt JSON ({e}); fit the router again with `emorl route --run RUN --fresh`") from e
    if meta.get("version") != ROUTER_VERSION:
        raise EmorlError(f"{p}: router file version {meta.get('version')!r} is not one this emorl reads "
                         f"({ROUTER_VERSION}); fit it again with `emorl route --run RUN --fresh`")
    return meta


def load_router(folder: str | Path, adapters: dict[str, str] | None = None) -> tuple[Router, dict[str, Any]]:
    """Load a router; ``adapters`` (name -> identity, see :func:`emorl.search.store.adapter_identity`) must be the
    ones it was fitted on, in the same order."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    if adapters is not None:
        fitted = meta.get("adapters", {})
        if list(fitted) != list(adapters) or fitted != adapters:
            diff = [n for n in {*fitted, *adapters} if fitted.get(n) != adapters.get(n)]
            raise EmorlError(f"{folder / 'router.json'} was fitted on other adapters (differ: {sorted(diff) or 'order'}"
                             f"; fitted on {list(fitted)}, these are {list(adapters)}); fit it again for these "
                             f"adapters: `emorl route --run RUN --fresh`")
    p = folder / "router.safetensors"
    if not p.exists():
        raise EmorlError(f"{p} is missing; fit the router again with `emorl route --run RUN --fresh`")
    t = load_file(str(p))
    router = Router(list(meta["names"]), meta["method"], t["emb"], t["best"], t["points"], t["global_weights"],
                    float(meta["threshold"]), int(meta["k"]), t.get("coef"), t.get("intercept"), meta.get("fit", {}))
    return router, meta


def run_adapters(run: str | Path, names: list[str]) -> dict[str, str]:
    from emorl.search.store import adapter_identity

    return {n: adapter_identity(Path(run) / "adapters" / n) for n in names}


def embed(prompts: list[str], device: str = "cpu") -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 embeddings of client statements, with the rewards' shared encoder (one copy per
    process: the reflection and empathy rewards reuse it)."""
    from emorl.rewards.text import default_encoder_path, shared_encoder

    enc = shared_encoder(default_encoder_path(), device, "route")
    return enc.encode(list(prompts)).cpu().numpy().astype(np.float64)

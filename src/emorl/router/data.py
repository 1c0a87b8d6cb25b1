"""The router's data: per-prompt, per-objective scores of a lattice of weight points on prompts the test split
never sees (the training split by default).

The router mixes by the base-anchored rule, ``h0 + Σ w_k (h_k − h0)``, the rule of the EMORL weights the study
reports: its lattice covers the anchored search's box [0, w_max]^K on a grid of ``step`` · w_max per axis (K=3,
step 0.5: 27 points, w = 0 — the base model — included), plus the anchored search's best point. All points are
decoded for all prompts in one batched multi-point ``generate`` per seed (common random numbers: every point draws
the same uniforms), with the evaluation's generation settings, and scored with every objective's reward. The
anchored search log's per-prompt rows (``per_prompt`` in ``RUN/search/hidden/points.jsonl``, where the search wrote
them) are kept as a second block of data.

Stored as ``RUN/router/data.json`` (prompts, points, settings, adapter identities) and ``data.safetensors``
(``scores``: points × seeds × prompts × objectives).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emorl.utils import EmorlError, atomic_write_bytes, atomic_write_json, read_jsonl

log = logging.getLogger("emorl.route")
DATA_VERSION = 2  # 2: base-anchored points on the box (1: convex points on the simplex)
ANCHOR = "base"  # the router's weight rule


@dataclass
class Block:
    """Scores of ``points`` (P×K) on ``prompts`` (B): ``scores`` has shape (P, S seeds, B, O objectives)."""

    prompts: list[str]
    points: np.ndarray
    scores: np.ndarray
    source: str = "lattice"

    def aggregate(self, objective_weights: np.ndarray) -> np.ndarray:
        """(B, P): each prompt's aggregate score of each point, averaged over seeds."""
        return np.einsum("psbo,o->bp", self.scores, objective_weights) / self.scores.shape[1]


@dataclass
class RouterData:
    names: list[str]
    objectives: list[str]
    blocks: list[Block]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lattice(self) -> Block:
        return self.blocks[0]


def simplex_lattice(n_adapters: int, step: float) -> np.ndarray:
    """Every point of the K-simplex whose coordinates are multiples of ``step`` (rows sum to 1), in a fixed order."""
    n = round(1 / step)
    if n_adapters < 1 or not 0 < step <= 1 or abs(n * step - 1) > 1e-9:
        raise EmorlError(f"route.step={step}: 1/step must be a whole number (0.5, 0.25, 0.2, 0.1, ...)")
    pts = [c for c in itertools.product(range(n + 1), repeat=n_adapters) if sum(c) == n]
    return np.array(pts, dtype=np.float64)[::-1] / n


def box_lattice(n_adapters: int, step: float, w_max: float) -> np.ndarray:
    """Every point of the box [0, w_max]^K whose coordinates are multiples of ``step`` · w_max, in a fixed order
    (K=3, step 0.5: 27 points; the all-zero point is the base model under the anchored rule)."""
    n = round(1 / step)
    if n_adapters < 1 or not 0 < step <= 1 or abs(n * step - 1) > 1e-9 or not w_max > 0:
        raise EmorlError(f"route.step={step}: 1/step must be a whole number (1, 0.5, 0.25, ...) and search.w_max > 0 "
                         f"(got {w_max})")
    return np.array(list(itertools.product(range(n + 1), repeat=n_adapters)), dtype=np.float64) * (w_max / n)


# The router mixes by the anchored rule, so its global point is the anchored EMORL search's (``hidden`` with
# search.anchor = base: the weights `emorl evaluate` reports as EMORL).
SEARCH_KEY = "hidden"


def search_best(run: Path, mode: str) -> np.ndarray | None:
    """The anchored search's best weight vector, as found (the scale is each adapter's strength), if
    ``RUN/search/<mode>/best.json`` exists and was searched with the anchored rule."""
    p = run / "search" / mode / "best.json"
    if not p.exists():
        return None
    best = json.loads(p.read_text())
    if best.get("anchor", ANCHOR) != ANCHOR:
        log.warning("%s was searched with the convex rule; the router's global point is its best lattice point", p)
        return None
    return np.asarray(best["weight_vector"], dtype=np.float64)


def with_point(points: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    if extra is None or any(np.allclose(extra, p) for p in points):
        return points
    return np.vstack([points, extra[None]])


def search_block(run: Path, mode: str, names: list[str], objectives: list[str]) -> Block | None:
    """Per-prompt rows of the anchored search log, where the search kept them (``per_prompt``: objective -> one
    mean per prompt, prompt list in the header); None when it did not or when it is not anchored."""
    p = run / "search" / mode / "points.jsonl"
    if not p.exists():
        return None
    rows = read_jsonl(p)
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    prompts = header.get("prompt_list", header.get("prompts"))
    if not isinstance(prompts, list) or not prompts or list(header.get("names", names)) != names or \
            header.get("anchor", ANCHOR) != ANCHOR:
        return None
    pts, scs = [], []
    for r in body:
        pp = r.get("per_prompt")
        w = np.asarray(r.get("weights", []), dtype=np.float64)
        if not isinstance(pp, dict) or w.shape != (len(names),) or \
                any(len(pp.get(o, [])) != len(prompts) for o in objectives):
            continue
        pts.append(w)
        scs.append(np.array([pp[o] for o in objectives], dtype=np.float64).T[None])  # (1 seed, B, O)
    if not pts:
        return None
    return Block(list(prompts), np.array(pts), np.array(scs), source=f"search/{mode}")


def decode_scores(ens: Any, prompts: list[str], points: np.ndarray, rewards: dict[str, Any], gen: Any,
                  seeds: list[int], mode: str = "hidden", anchor: str = ANCHOR) -> np.ndarray:
    """(P, S, B, O) scores of every point × seed × prompt, one batched multi-point decode per seed."""
    from emorl.decoding import generation_kwargs
    from emorl.rewards import score

    out = np.zeros((len(points), len(seeds), len(prompts), len(rewards)))
    for si, seed in enumerate(seeds):
        res = ens.generate(list(prompts), points, mode=mode, seed=seed, anchor=anchor, **generation_kwargs(gen))
        flat = [t for group in res.all_texts for t in group]
        for oi, rw in enumerate(rewards.values()):
            out[:, si, :, oi] = score(rw, list(prompts) * len(points), flat).reshape(len(points), len(prompts))
    return out


def training_prompts(cfg: Any, split: str, n: int | None) -> list[str]:
    from emorl.data import load_splits

    if split == "test":
        raise EmorlError("route.split: the router is never fitted on the test split (the comparison uses it)")
    recs = load_splits(cfg.data)[split]
    prompts = [r.prompt for r in recs[:n] if r.prompt.strip()]
    if len(prompts) < 2:
        raise EmorlError(f"route: the {split!r} split has {len(prompts)} prompts; the router needs at least 2 "
                         f"(raise data.max_prompts or route.prompts)")
    return prompts


def collect(run: str | Path, cfg: Any, ens: Any, rewards: dict[str, Any], *, split: str | None = None,
            prompts: list[str] | None = None, mode: str = "hidden") -> RouterData:
    """Decode and score the anchored lattice (plus the anchored search's best point) on the router's prompts."""
    from emorl.search.store import adapter_identity

    run = Path(run)
    rc = cfg.route
    split = split or rc.split
    prompts = prompts or training_prompts(cfg, split, rc.prompts)
    names, objectives = list(ens.names), list(rewards)
    best = search_best(run, SEARCH_KEY) if rc.use_search else None
    points = with_point(box_lattice(len(names), rc.step, cfg.search.w_max), best)
    t0 = time.perf_counter()
    scores = decode_scores(ens, prompts, points, rewards, cfg.eval.generation, list(rc.seeds), mode)
    seconds = time.perf_counter() - t0
    blocks = [Block(prompts, points, scores)]
    extra = search_block(run, SEARCH_KEY, names, objectives) if rc.use_search else None
    if extra is not None:
        blocks.append(extra)
    adapters = {n: adapter_identity(run / "adapters" / n) for n in names} if (run / "adapters").exists() else {}
    meta = {"version": DATA_VERSION, "split": split, "mode": mode, "anchor": ANCHOR, "step": rc.step,
            "w_max": cfg.search.w_max, "seeds": list(rc.seeds),
            "generation": asdict(cfg.eval.generation), "adapters": adapters, "decode_s": round(seconds, 2),
            "pairs": int(len(points) * len(prompts) * len(rc.seeds)), "search_best": None if best is None
            else best.tolist()}
    log.info("router data: %d points x %d prompts x %d seeds in %.1f s", len(points), len(prompts), len(rc.seeds),
             seconds)
    return RouterData(names, objectives, blocks, meta)


def save_data(folder: str | Path, data: RouterData, stem: str = "data") -> None:
    from safetensors.numpy import save

    folder = Path(folder)
    tensors = {f"scores.{i}": b.scores.astype(np.float32) for i, b in enumerate(data.blocks)}
    tensors |= {f"points.{i}": b.points.astype(np.float64) for i, b in enumerate(data.blocks)}
    atomic_write_bytes(folder / f"{stem}.safetensors", save(tensors))
    atomic_write_json(folder / f"{stem}.json", {**data.meta, "names": data.names, "objectives": data.objectives,
                                                "blocks": [{"source": b.source, "prompts": b.prompts}
                                                           for b in data.blocks]})


def load_data(folder: str | Path, stem: str = "data") -> RouterData:
    from safetensors.numpy import load_file

    folder = Path(folder)
    jp, tp = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not jp.exists() or not tp.exists():
        raise EmorlError(f"{folder}: no router data ({jp.name}, {tp.name}); make it with `emorl route --run RUN`")
    meta = json.loads(jp.read_text())
    if meta.get("version") != DATA_VERSION:
        raise EmorlError(f"{jp}: router data version {meta.get('version')!r}, this emorl reads {DATA_VERSION}; "
                         f"make it again with `emorl route --run RUN --fresh`")
    t = load_file(str(tp))
    blocks = [Block(b["prompts"], t[f"points.{i}"], t[f"scores.{i}"].astype(np.float64), b["source"])
              for i, b in enumerate(meta.pop("blocks"))]
    return RouterData(meta.pop("names"), meta.pop("objectives"), blocks, meta)

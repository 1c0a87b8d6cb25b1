"""The router's data: per-prompt, per-objective scores of a lattice of weight points on prompts the test split
never sees (the training split by default).

The lattice is every point of the simplex with coordinates on a grid of ``step`` (K=3, step 0.25: 15 points),
plus the search's best point. All points are decoded for all prompts in one batched multi-point ``generate`` per
seed (common random numbers: every point draws the same uniforms), with the evaluation's generation settings, and
scored with every objective's reward. The search log's per-prompt rows (``per_prompt`` in
``RUN/search/<mode>/points.jsonl``, where the search wrote them) are kept as a second block of data.

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
DATA_VERSION = 1


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


def simplex_lattice(k: int, step: float) -> np.ndarray:
    """Every point of the K-simplex whose coordinates are multiples of ``step`` (rows sum to 1), in a fixed order."""
    n = round(1 / step)
    if k < 1 or not 0 < step <= 1 or abs(n * step - 1) > 1e-9:
        raise EmorlError(f"route.step={step}: 1/step must be a whole number (0.5, 0.25, 0.2, 0.1, ...)")
    pts = [c for c in itertools.product(range(n + 1), repeat=k) if sum(c) == n]
    return np.array(pts, dtype=np.float64)[::-1] / n


# The router's weights lie on the simplex (convex mixes), so its global point is the convex EMORL search's.
SEARCH_KEY = "hidden-convex"


def search_best(run: Path, mode: str) -> np.ndarray | None:
    """The search's best weight vector (normalised to sum 1), if ``RUN/search/<mode>/best.json`` exists."""
    p = run / "search" / mode / "best.json"
    if not p.exists():
        return None
    w = np.asarray(json.loads(p.read_text())["weight_vector"], dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else None


def with_point(points: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    if extra is None or any(np.allclose(extra, p) for p in points):
        return points
    return np.vstack([points, extra[None]])


def search_block(run: Path, mode: str, names: list[str], objectives: list[str]) -> Block | None:
    """Per-prompt rows of the search log, where the search kept them (``per_prompt``: objective -> one mean per
    prompt, prompt list in the header); None when it did not."""
    p = run / "search" / mode / "points.jsonl"
    if not p.exists():
        return None
    rows = read_jsonl(p)
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    prompts = header.get("prompt_list", header.get("prompts"))
    if not isinstance(prompts, list) or not prompts or list(header.get("names", names)) != names:
        return None
    pts, scs = [], []
    for r in body:
        pp = r.get("per_prompt")
        w = np.asarray(r.get("weights", []), dtype=np.float64)
        if not isinstance(pp, dict) or w.shape != (len(names),) or w.sum() <= 0 or \
                any(len(pp.get(o, [])) != len(prompts) for o in objectives):
            continue
        pts.append(w / w.sum())
        scs.append(np.array([pp[o] for o in objectives], dtype=np.float64).T[None])  # (1 seed, B, O)
    if not pts:
        return None
    return Block(list(prompts), np.array(pts), np.array(scs), source=f"search/{mode}")


def decode_scores(ens: Any, prompts: list[str], points: np.ndarray, rewards: dict[str, Any], gen: Any,
                  seeds: list[int], mode: str = "hidden") -> np.ndarray:
    """(P, S, B, O) scores of every point × seed × prompt, one batched multi-point decode per seed."""
    from emorl.decoding import generation_kwargs
    from emorl.rewards import score

    out = np.zeros((len(points), len(seeds), len(prompts), len(rewards)))
    for si, seed in enumerate(seeds):
        res = ens.generate(list(prompts), points, mode=mode, seed=seed, anchor="none",
                           **generation_kwargs(gen))
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
    """Decode and score the lattice (plus the search's best point) on the router's prompts."""
    from emorl.search.store import adapter_identity

    run = Path(run)
    rc = cfg.route
    split = split or rc.split
    prompts = prompts or training_prompts(cfg, split, rc.prompts)
    names, objectives = list(ens.names), list(rewards)
    best = search_best(run, SEARCH_KEY) if rc.use_search else None
    points = with_point(simplex_lattice(len(names), rc.step), best)
    t0 = time.perf_counter()
    scores = decode_scores(ens, prompts, points, rewards, cfg.eval.generation, list(rc.seeds), mode)
    seconds = time.perf_counter() - t0
    blocks = [Block(prompts, points, scores)]
    extra = search_block(run, SEARCH_KEY, names, objectives) if rc.use_search else None
    if extra is not None:
        blocks.append(extra)
    adapters = {n: adapter_identity(run / "adapters" / n) for n in names} if (run / "adapters").exists() else {}
    meta = {"version": DATA_VERSION, "split": split, "mode": mode, "step": rc.step, "seeds": list(rc.seeds),
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

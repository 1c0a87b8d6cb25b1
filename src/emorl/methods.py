"""The method registry: which methods exist, what each is (kind, search mode, label), what decoding one needs
(:class:`MethodSpec`, checked on disk by :func:`resolve_methods`), what it cost, and the prompts and seeds every
method is decoded with.

Methods (:data:`METHODS`): ``base`` (the untuned model, adapters disabled), ``emorl`` (hidden-state mixing with
the weights searched in ``RUN/search/hidden``), ``soups`` (parameter mixing, ``search/params``), ``logits`` (logit
mixing, ``search/logits``), the one-policy baselines ``uniform``, ``dynaopt``, ``gdpo`` and ``fixed``
(``RUN/baselines/<name>``), ``single:<objective>`` (one EMORL adapter alone) and ``emorl-routed`` (per-prompt
weights from ``RUN/router/``: the router computes them, :attr:`MethodSpec.row_weights` carries them down to
:meth:`emorl.decoding.Decoder.decode`). The evaluation, the router's comparison, the fronts and the server all
read this one registry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorl.config import RunConfig
from emorl.utils import EmorlError

log = logging.getLogger("emorl.methods")

# method name -> (kind, search key). kind: base | adapter (one-policy baseline) | ensemble (searched mix) | routed
# (per-prompt weights). The search key names the mix (emorl.decoding.parse_mix): "hidden" follows search.anchor
# (default: base-anchored), "-convex" is the sum-1 form. The evaluation decodes each mix exactly as its search
# scored it (mode and anchor of best.json).
METHODS: dict[str, tuple[str, str | None]] = {
    "base": ("base", None),
    "uniform": ("adapter", None),
    "dynaopt": ("adapter", None),
    "gdpo": ("adapter", None),
    "fixed": ("adapter", None),
    "soups": ("ensemble", "params"),
    "soups-avg": ("ensemble", "params-convex"),
    "logits": ("ensemble", "logits"),
    "probs": ("ensemble", "probs"),
    "emorl": ("ensemble", "hidden"),
    "emorl-convex": ("ensemble", "hidden-convex"),
    "emorl-routed": ("routed", "hidden-convex"),  # per-prompt weights from RUN/router/ (emorl.router), convex
}
LABELS = {"base": "Base model", "uniform": "Uniform Weighted", "dynaopt": "DynaOpt", "gdpo": "GDPO",
          "fixed": "Fixed weights",
          "soups": "Model Soups (task arithmetic)", "soups-avg": "Model Soups (parameter average)",
          "logits": "Logit mixing", "probs": "Probability mixing", "emorl": "EMORL",
          "emorl-convex": "EMORL (convex mix)", "emorl-routed": "EMORL, routed weights"}
MODE_METHOD = {key: name for name, (kind, key) in METHODS.items() if key}
SINGLE = "single:"  # "single:<objective>": that objective's EMORL adapter alone; "singles" = one per objective


@dataclass
class MethodSpec:
    """What decoding one method needs: its adapters (name -> folder), and for a mix, the mode and weights."""

    name: str
    kind: str  # base | adapter | ensemble | routed
    mode: str | None = None  # the mix's mode (hidden, logits, probs, params)
    adapters: dict[str, Path] = field(default_factory=dict)
    weights: list[float] | None = None
    search: dict[str, Any] | None = None  # the mode's best.json (ensemble methods)
    anchor: str = "base"  # the weight rule the search scored it with (ensemble methods)
    search_key: str | None = None  # RUN/search/<search_key>/
    router: Path | None = None  # routed methods: the run folder whose RUN/router/ picks per-prompt weights
    # routed methods: one weight row per prompt (B x K), set by the caller from the router before decoding
    row_weights: list[list[float]] | None = None

    @property
    def label(self) -> str:
        return method_label(self.name)


def method_label(name: str) -> str:
    """The name a report and the server show for a method."""
    return f"{name.removeprefix(SINGLE)} adapter alone" if name.startswith(SINGLE) else LABELS.get(name, name)


def expand_methods(methods: Sequence[str], objectives: Sequence[str]) -> list[str]:
    """Check method names and expand ``singles`` to ``single:<objective>`` for every objective."""
    out: list[str] = []
    for m in methods:
        names = [f"{SINGLE}{o}" for o in objectives] if m == "singles" else [m]
        for n in names:
            if n not in METHODS and not (n.startswith(SINGLE) and n.removeprefix(SINGLE) in objectives):
                raise EmorlError(f"eval.methods: unknown method {n!r}; choose from {', '.join(METHODS)}, 'singles' "
                                 f"(each objective's adapter alone) or 'single:<objective>' with one of "
                                 f"{', '.join(objectives)}")
            if n in out:
                raise EmorlError(f"eval.methods: {list(methods)} lists {n!r} twice")
            out.append(n)
    return out


def method_kind(name: str) -> tuple[str, str | None]:
    """(kind, search mode) of a method name."""
    return ("adapter", None) if name.startswith(SINGLE) else METHODS[name]


def ensemble_objectives(cfg: RunConfig) -> list[str]:
    """The K objectives whose adapters EMORL mixes: every objective of the config, in config order.

    ``train.objectives`` is a per-call selection of ``emorl train`` (e.g. ``--objectives newobj`` to add one
    adapter); the ensemble always uses all of them, which is how a new objective joins an existing run."""
    return list(cfg.objectives)


def resolve_methods(run_dir: str | Path, cfg: RunConfig, methods: Sequence[str] | None = None) -> list[MethodSpec]:
    """Check that every method's inputs exist on disk (adapters, baselines, search results) before any model
    is loaded; the error names the missing file and the command that makes it."""
    from emorl.search.store import adapter_identity

    run = Path(run_dir)
    objectives = ensemble_objectives(cfg)
    methods = expand_methods(methods or cfg.eval.methods, objectives)
    specs = []
    for m in methods:
        kind, mode = method_kind(m)
        if kind == "base":
            specs.append(MethodSpec(m, kind))
        elif m.startswith(SINGLE):
            o = m.removeprefix(SINGLE)
            folder = run / "adapters" / o
            if not (folder / "adapter_model.safetensors").exists():
                raise EmorlError(f"method {m!r}: no adapter in {folder}. Train it with `emorl train --run {run} "
                                 f"--objectives {o}`")
            specs.append(MethodSpec(m, kind, adapters={o: folder}, weights=[1.0]))
        elif kind == "routed":
            if not (run / "router" / "router.json").exists():  # its version is checked where it is loaded
                raise EmorlError(f"method {m!r}: no router in {run / 'router'}; fit one with `emorl route --run "
                                 f"{run}`")
            specs.append(MethodSpec(m, kind, "hidden", {o: run / "adapters" / o for o in objectives}, anchor="none",
                                    router=run))
        elif kind == "adapter":
            folder = run / "baselines" / m
            if not (folder / "adapter_model.safetensors").exists():
                raise EmorlError(f"method {m!r}: no trained baseline in {folder}. Train it with `emorl train --run "
                                 f"{run} --strategy {m}` (or `emorl run`), or drop it from --methods")
            specs.append(MethodSpec(m, kind, adapters={m: folder}, weights=[1.0]))
        else:
            from emorl.decoding import parse_mix

            folders = {o: run / "adapters" / o for o in objectives}
            missing = [o for o, f in folders.items() if not (f / "adapter_model.safetensors").exists()]
            if missing:
                raise EmorlError(f"method {m!r}: no adapter for objective(s) {', '.join(missing)} in "
                                 f"{run / 'adapters'}. Train them with `emorl train --run {run} --objectives "
                                 f"{','.join(missing)}`")
            key = str(mode)
            best_path = run / "search" / key / "best.json"
            if not best_path.exists():
                raise EmorlError(f"method {m!r}: {best_path} is missing. Search its weights first: `emorl search "
                                 f"--run {run} --mode {key}`")
            best = json.loads(best_path.read_text())
            if list(best.get("names", [])) != objectives:
                raise EmorlError(f"method {m!r}: {best_path} holds weights for {best.get('names')}, but the run's "
                                 f"objectives are {objectives}. Search again: `emorl search --run {run} --mode {key} "
                                 f"--fresh`")
            if "anchor" not in best:
                raise EmorlError(f"method {m!r}: {best_path} was written before the weight rule (anchor) was recorded, "
                                 f"so emorl cannot decode it as it was searched. Search again: `emorl search --run "
                                 f"{run} --mode {key} --fresh`")
            known = best.get("adapters", {})
            stale = [o for o, f in folders.items() if known.get(o) not in (None, adapter_identity(f))]
            if stale:
                raise EmorlError(f"method {m!r}: the adapters {stale} changed after {best_path} was written. Search "
                                 f"again: `emorl search --run {run} --mode {key} --fresh`")
            mix_mode, _ = parse_mix(key, cfg.search.anchor)
            anchor = str(best["anchor"])
            weights = [float(x) for x in best["weight_vector"]]
            if not any(weights) and anchor == "none":
                weights = best_decodable(best_path.parent, m)
            specs.append(MethodSpec(m, kind, mix_mode, folders, weights, best, anchor, key))
    return specs


def best_decodable(folder: Path, method: str) -> list[float]:
    """The best logged point other than the all-zero one. A search whose points all score the same (e.g. a
    random tiny model whose replies all score 0) may report w = 0, which cannot be decoded."""
    from emorl.utils import read_jsonl

    rows = [r for r in read_jsonl(folder / "points.jsonl")[1:] if any(r["weights"]) and r.get("aggregate") is not None]
    if not rows:
        raise EmorlError(f"method {method!r}: {folder} holds no decodable weight point (all zero); search again")
    best = max(rows, key=lambda r: r["aggregate"])  # first maximum in log order
    log.warning("%s: the best point of %s is all zero (every point scored the same?); using %s instead", method,
                folder, best["weights"])
    return [float(x) for x in best["weights"]]


def training_sessions(run_dir: Path) -> dict[str, tuple[str, float]]:
    """policy -> (training session, that session's wall time), from ``RUN/curves/<session>.json``.

    Policies trained together in one process (EMORL's K adapters, batched) share every step, so each one's own
    wall time is the session's time, not a K-th of it: the cost of the session is the longest policy's time."""
    out: dict[str, tuple[str, float]] = {}
    for f in sorted((run_dir / "curves").glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        longest = max((float(v.get("wall_time_s", 0.0)) for v in data.values()), default=0.0)
        for name in data:
            out[name] = (f.stem, longest)
    return out


def training_cost(spec: MethodSpec) -> dict[str, Any]:
    """Prompts consumed and wall time of the training behind a method: mixes count their K adapters (prompts:
    the sum; time: the sum over training sessions, K adapters trained together counting once), with per-adapter
    figures; the base model cost nothing."""
    from emorl.models import read_adapter_info

    per: dict[str, dict[str, Any]] = {}
    sessions: dict[str, float] = {}
    for name, folder in spec.adapters.items():
        info = read_adapter_info(folder)
        found = training_sessions(Path(folder).parent.parent).get(name)
        session, seconds = found if found else (f"own:{name}", info.wall_time_s)
        sessions[session] = max(sessions.get(session, 0.0), seconds)
        per[name] = {"prompts": info.prompts_consumed, "wall_time_s": info.wall_time_s, "steps": info.steps,
                     "converged": info.converged, "stop_reason": info.extra.get("stop_reason", ""),
                     "session": session}
    return {"prompts": sum(p["prompts"] for p in per.values()), "wall_time_s": round(sum(sessions.values()), 2),
            "sessions": len(sessions), "per_adapter": per}


def search_cost(spec: MethodSpec) -> dict[str, Any] | None:
    """What the weight search behind a mix cost (from its best.json); None for methods without one."""
    if not spec.search:
        return None
    b = spec.search
    return {"mode": spec.mode, "wall_time_s": b.get("wall_time_s"), "points": b.get("points"),
            "decoded": b.get("decoded"), "aggregate": b.get("aggregate"), "scores": b.get("scores")}


def any_adapter(run: Path, specs: Sequence[MethodSpec]) -> dict[str, Path] | None:
    """One adapter of the run (a method's, else any on disk), for decoding the base through the same engine."""
    for s in specs:
        for name, folder in s.adapters.items():
            return {name: folder}
    for sub in ("adapters", "baselines"):
        for folder in sorted((run / sub).glob("*/adapter_model.safetensors")):
            return {folder.parent.name: folder.parent}
    return None


def eval_prompts(cfg: RunConfig, split: str | None = None) -> list[str]:
    """The prompts every method is decoded on: the first ``eval.prompts`` non-empty ones of ``split``."""
    from emorl.data import load_splits

    split = split or cfg.eval.split
    records = load_splits(cfg.data)[split]
    prompts = [r.prompt for r in records[: cfg.eval.prompts] if r.prompt.strip()]
    if not prompts:
        raise EmorlError(f"the {split!r} split of the {cfg.data.source!r} data is empty; raise data.max_prompts or "
                         f"that split's fraction in data.split, or evaluate another split (--split)")
    return prompts


def decode_seeds(cfg: RunConfig) -> list[int]:
    """Greedy decoding ignores the seed, so it runs once; sampling runs once per ``eval.seeds`` entry."""
    seeds = list(dict.fromkeys(cfg.eval.seeds))
    if not seeds:
        raise EmorlError("eval.seeds: give at least one seed, e.g. eval.seeds=[0,1,2]")
    return seeds if cfg.eval.generation.do_sample else seeds[:1]


def decoding_parts(cfg: RunConfig, base_adapter: dict[str, Path] | None, base: Any = None, rewards: Any = None,
                   decode: Any = None) -> tuple[Any, Any, Any]:
    """(base, rewards, decode) for scoring methods, each loaded only where the caller did not pass one: the
    evaluation and every extra prompt set share one model, one set of rewards and one decoder."""
    if base is None:
        from emorl.models import load_base

        base = load_base(cfg.model)
    if rewards is None:
        from emorl.rewards import build_rewards

        rewards = build_rewards(cfg.objectives, base)
    if decode is None:
        from emorl.decoding import Decoder, decode_with

        decode = decode_with(Decoder(base, cfg.eval.generation, base_adapter))
    return base, rewards, decode

"""The plan of ``emorl run``: which units of each stage are current, from ``RUN/stages.json`` and the outputs.

A unit is one adapter, one search mode, the evaluation or the report. Each records the settings it was made with;
a unit whose output is missing or whose settings differ from the config must run (or be redone). Nothing here loads
a model, so every check happens before any long work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorl.config import LoraConfig, RunConfig
from emorl.methods import ensemble_objectives, expand_methods, method_kind
from emorl.utils import EmorlError, atomic_write_json

log = logging.getLogger("emorl.run")

BASELINES = ("uniform", "dynaopt", "fixed", "gdpo")
# training settings that do not change what is learned (bookkeeping) or that name what a call trains
TRAIN_IGNORED = {"objectives", "strategy", "checkpoint_every", "log_every", "report_to", "micro_batch_size"}
MODEL_IGNORED = {"device", "cache_dir"}


# ------------------------------------------------------------------------------------------- settings

def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """None if the settings are equal, else "settings changed: a.b, c" (the first few differing keys).

    A key the old record lacks is a config option added since: its default keeps the old behaviour, so it does
    not count (otherwise every new option would retrain every run)."""
    if old is None:
        return "made by an earlier version (no settings recorded)"
    a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    keys = sorted(k for k in a if a[k] != b.get(k))
    if not keys:
        return None
    shown = [f"{k} {a[k]} -> {b.get(k)}" if isinstance(a[k], list) else k for k in keys[:4]]
    return "settings changed: " + ", ".join(shown) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def _train_settings(train: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train.items() if k not in TRAIN_IGNORED}


def train_settings(cfg: RunConfig, name: str, objectives: list[str]) -> dict[str, Any]:
    """What an adapter's weights depend on: model, LoRA, data, training settings, its strategy and rewards."""
    d = cfg.to_dict()
    return {"model": {k: v for k, v in d["model"].items() if k not in MODEL_IGNORED}, "lora": d["lora"],
            "data": d["data"], "train": _train_settings(d["train"]),
            "strategy": "single" if name in cfg.objectives else name, "objectives": list(objectives),
            "rewards": {o: cfg.objectives[o] for o in objectives}}


def adapter_matches(cfg: RunConfig, folder: Path, objectives: list[str]) -> str | None:
    """None if the adapter's own ``emorl.json`` matches the config, else what differs (for adapters that the
    pipeline did not train itself, e.g. one added with ``emorl train --run RUN --objectives new``)."""
    from emorl.models import read_adapter_info

    info = read_adapter_info(folder)
    d = cfg.to_dict()
    if not info.extra.get("finished"):
        return "not finished"
    if list(info.objectives) != list(objectives):
        return f"trained on objectives {info.objectives}, the run now has {objectives}"
    if info.base.get("name") != cfg.model.name:
        return f"trained on model {info.base.get('name')!r}, the run uses {cfg.model.name!r}"
    # an option added since the adapter was trained (absent from its record) had its default's behaviour
    old_lora = {**dataclasses.asdict(LoraConfig()), **info.extra.get("lora", {})}
    diffs = [f"lora.{k}" for k in d["lora"] if old_lora.get(k) != d["lora"][k]]
    old_train = _train_settings(info.extra.get("train", {}))
    new_train = _train_settings(d["train"])
    diffs += [f"train.{k}" for k in sorted(old_train) if old_train[k] != new_train.get(k)]  # new options: see changed
    diffs += [f"objectives.{o}" for o in objectives if info.rewards.get(o) != cfg.objectives[o]]
    return f"settings changed: {', '.join(diffs)}" if diffs else None


def search_settings(cfg: RunConfig, mode: str, adapters: dict[str, str | None]) -> dict[str, Any]:
    d = cfg.to_dict()
    # the name lists are single values: a new objective is a change, not an option added since (see `changed`)
    return {"mode": mode, "names": list(adapters), "adapters": adapters, "search": d["search"],
            "objective_names": list(cfg.objectives), "objectives": cfg.objectives,
            "data": d["data"], "model": [cfg.model.name, cfg.model.max_prompt_tokens, cfg.model.system_prompt]}


# ------------------------------------------------------------------------------------------- the plan

@dataclass
class Step:
    """One unit of a stage: what it makes, whether it must run, and why."""

    stage: str
    name: str
    status: str  # "run" | "redo" | "done" | "resume"
    reason: str = ""
    estimate_s: float = 0.0


@dataclass
class Plan:
    cfg: RunConfig
    run: Path
    objectives: list[str]
    baselines: list[str]
    modes: list[str]
    methods: list[str]
    steps: list[Step] = field(default_factory=list)

    def stage(self, name: str) -> list[Step]:
        return [s for s in self.steps if s.stage == name]

    def todo(self, name: str) -> list[Step]:
        return [s for s in self.stage(name) if s.status != "done"]


class Stages:
    """``RUN/stages.json``: per unit, the settings it was made with; per stage, how long it took."""

    def __init__(self, run: Path) -> None:
        self.path = run / "stages.json"
        self.data: dict[str, Any] = {"units": {}, "stages": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is corrupt; every stage will be checked from its outputs", self.path)
            self.data.setdefault("units", {})
            self.data.setdefault("stages", {})

    def unit(self, key: str) -> dict[str, Any]:
        return self.data["units"].get(key, {})

    def record(self, key: str, **kw: Any) -> None:
        self.data["units"][key] = kw
        self.save()

    def stage_done(self, name: str, status: str, seconds: float) -> None:
        self.data["stages"][name] = {"status": status, "wall_time_s": round(seconds, 2),
                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def adapter_id(folder: Path) -> str | None:
    from emorl.search.store import adapter_identity

    try:
        return adapter_identity(folder)
    except EmorlError:
        return None


def make_plan(cfg: RunConfig, run: Path, *, resume: bool = False, force: bool = False) -> Plan:
    """Decide, without loading a model, which units of every stage must run and why."""
    objectives = ensemble_objectives(cfg)
    methods = expand_methods(cfg.eval.methods, objectives)
    clash = [o for o in objectives if o in BASELINES]
    if clash:
        raise EmorlError(f"objectives: {clash} is also the name of a baseline; rename the objective")
    baselines = [m for m in methods if m in BASELINES]
    if "fixed" in baselines and (not cfg.train.fixed_weights or len(cfg.train.fixed_weights) != len(objectives)):
        raise EmorlError(f"eval.methods has 'fixed': set train.fixed_weights to {len(objectives)} weights")
    modes = list(dict.fromkeys([*cfg.search.modes, *(mode for m in methods if (mode := method_kind(m)[1]))]))
    plan = Plan(cfg, run, objectives, baselines, modes, methods)
    stages = Stages(run)
    ids: dict[str, str | None] = {}

    def train_step(stage: str, name: str, folder: Path, objs: list[str]) -> None:
        ids[name] = adapter_id(folder)
        settings = train_settings(cfg, name, objs)
        # the local executor checkpoints the K adapters together, the Ray executor each one alone
        ckpts = [run / "checkpoints" / n for n in (["single-" + "+".join(objectives), f"single-{name}"]
                                                    if stage == "train" else [name])]
        if ids[name] is None:
            partial = resume and any((c / "state.json").exists() for c in ckpts)
            plan.steps.append(Step(stage, name, "resume" if partial else "run", "from its checkpoint" if partial
                                   else "not trained yet"))
            return
        rec = stages.unit(f"train/{name}")
        why = changed(rec["settings"], settings) if rec.get("adapter") == ids[name] and "settings" in rec \
            else adapter_matches(cfg, folder, objs)
        if force:
            why = "--force"
        plan.steps.append(Step(stage, name, "redo" if why else "done", why or "up to date"))

    for o in objectives:
        train_step("train", o, run / "adapters" / o, [o])
    for b in baselines:
        train_step("baselines", b, run / "baselines" / b, objectives)
    adapters_now = {o: ids[o] for o in objectives}
    for mode in modes:
        best = run / "search" / mode / "best.json"
        rec = stages.unit(f"search/{mode}")
        if any(ids[o] is None for o in objectives) or any(s.status != "done" for s in plan.stage("train")):
            status, why = "run", "after training"
        elif force:
            status, why = "redo", "--force"
        elif best.exists() and not changed(rec.get("settings"), search_settings(cfg, mode, adapters_now)):
            status, why = "done", "up to date"
        elif (run / "search" / mode / "points.jsonl").exists() and not best.exists() and resume:
            status, why = "resume", "from its points log"
        elif best.exists():
            status, why = "redo", changed(rec.get("settings"), search_settings(cfg, mode, adapters_now)) or ""
            why = why.replace("adapters.", "adapter ")
        else:
            status, why = "run", "not searched yet"
        plan.steps.append(Step("search", mode, status, why))
    if cfg.route.enabled or "emorl-routed" in methods:
        from emorl.router.run import route_status

        status, why = ("run", "after training and search") if any(s.status != "done" for s in plan.steps) \
            else ("redo", "--force") if force else route_status(cfg, run, adapters_now)
        plan.steps.append(Step("route", "router", status, why))
    upstream = any(s.status != "done" for s in plan.steps)
    eval_done = not upstream and not force and _eval_current(cfg, run, methods)
    plan.steps.append(Step("evaluate", ", ".join(methods), "done" if eval_done else "run",
                           "up to date" if eval_done else f"{cfg.eval.prompts or 'all'} {cfg.eval.split} prompts"))
    if cfg.front.enabled:
        rec = stages.unit("front")
        front_done = (eval_done and not force and (run / "front" / "front.json").exists()
                      and rec.get("results") == file_hash(run / "eval" / "results.json")
                      and rec.get("settings") == front_settings(cfg))
        plan.steps.append(Step("front", ", ".join(cfg.front.modes), "done" if front_done else "run",
                               "up to date" if front_done else f"lattice step {cfg.front.step}"))
        eval_done = eval_done and front_done
    report_done = eval_done and (run / "report.md").exists() and stages.unit("report").get("results") == \
        file_hash(run / "eval" / "results.json") and stages.unit("report").get("front") == \
        file_hash(run / "front" / "front.json")
    plan.steps.append(Step("report", "report.md, results.json, figures/", "done" if report_done else "run"))
    return plan


def front_settings(cfg: RunConfig) -> dict[str, Any]:
    """What the front stage's output depends on besides the evaluation (whose results file is hashed)."""
    d = cfg.to_dict()
    return {k: v for k, v in d["front"].items() if k != "enabled"}


def file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def _eval_current(cfg: RunConfig, run: Path, methods: list[str]) -> bool:
    from emorl.evaluate import load_results, method_signature
    from emorl.methods import decode_seeds, eval_prompts, resolve_methods

    try:
        old = load_results(run)
        if not old or old.get("split") != cfg.eval.split:
            return False
        specs = resolve_methods(run, cfg, methods)
        prompts, seeds = eval_prompts(cfg), decode_seeds(cfg)
    except EmorlError:
        return False
    return all(old["methods"].get(s.name, {}).get("signature") == method_signature(s, cfg, prompts, seeds)
               for s in specs)

"""``emorl run``: the whole study in one command, stage by stage, each stage skipped when its output is current.

1. **train**: one LoRA adapter per objective with k-SCST (EMORL, strategy ``single``) -> ``RUN/adapters/<obj>/``
2. **baselines**: the one-policy baselines named in ``eval.methods`` (``uniform``, ``dynaopt``, ``gdpo``) ->
   ``RUN/baselines/``
3. **search**: the hierarchical weight search for every mode in ``search.modes`` (``hidden`` = EMORL, ``params`` =
   Model Soups, ``logits``) -> ``RUN/search/<mode>/``
   (3b. **route**, when ``route.enabled``: the per-prompt weight router -> ``RUN/router/``, see docs/router.md)
4. **evaluate**: every method on the test split, decoded with the same settings and seeds -> ``RUN/eval/``
5. **report**: ``RUN/report.md``, ``RUN/results.json``, ``RUN/figures/``

What "current" means is recorded in ``RUN/stages.json``: the settings each output depends on (an
adapter: model, LoRA, data, training settings and its reward; a search: the adapters' file hashes and the search
settings; ...). A changed setting redoes exactly the stages downstream of it. Adapters trained outside the pipeline
(``emorl train --run RUN --objectives new``) are accepted when their ``emorl.json`` matches the config, so a new
objective joins the run without touching the other adapters. ``--resume`` continues an interrupted stage from its
checkpoint (training) or log (search) instead of starting that stage over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emorl.config import RunConfig
from emorl.executors import Executor, TrainJob, make_executor
from emorl.executors.local import Resources
from emorl.pipeline.estimate import describe_plan, duration, estimate, probe_speed
from emorl.pipeline.plan import (
    BASELINES,
    Plan,
    Stages,
    Step,
    adapter_id,
    changed,
    file_hash,
    make_plan,
    search_settings,
    train_settings,
)
from emorl.utils import EmorlError

log = logging.getLogger("emorl.run")

__all__ = ["BASELINES", "Plan", "Stages", "Step", "add_parser", "changed", "describe_plan", "make_plan",
           "run_pipeline"]


# ------------------------------------------------------------------------------------------- execution

def normalised(cfg: RunConfig, run: Path) -> RunConfig:
    """The config as the run folder keeps it: every objective trained (no per-call selection), EMORL strategy."""
    return dataclasses.replace(cfg, output=str(run), train=dataclasses.replace(cfg.train, strategy="single",
                                                                                   objectives=None))


def run_pipeline(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True, dry_run: bool = False,
                 after_stage: Callable[[str], None] | None = None) -> Plan:
    """Run (or continue) the whole study in ``run_dir``. ``after_stage(name)`` is called after each stage (a
    hook for tests and callers that want to stop between stages)."""
    from filelock import FileLock, Timeout

    from emorl.utils import console

    run = Path(run_dir)
    cfg = normalised(cfg, run)
    plan = make_plan(cfg, run, resume=resume, force=force)  # every check that needs no model happens here
    con = console()
    res = Resources(cfg)
    if cfg.executor.kind == "ray":
        from emorl.executors.ray_backend import import_ray

        import_ray()  # not installed: the install command now, not after the plan
    busy = [s for s in plan.steps if s.status != "done" and s.stage != "report"]
    if busy:
        estimate(plan, probe_speed(res.base, rewards=res.rewards))
    con.print(describe_plan(plan))
    if dry_run:
        return plan
    run.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run / ".emorl-run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise EmorlError(f"another `emorl run` is working in {run} (lock {run / '.emorl-run.lock'}); wait for it, "
                         f"or use another --output folder") from None
    try:
        cfg.save(run / "config.yaml")
        stages = Stages(run)
        if busy:  # what this run's new numbers are computed on (another CPU rounds bf16 differently)
            from emorl.models import environment

            stages.data["environment"] = environment(res.base)
            stages.save()
        t_all = time.perf_counter()
        executor = None
        for stage in ("train", "baselines", "search", "route", "evaluate", "front", "report"):
            todo = plan.todo(stage)
            if not todo:
                if plan.stage(stage) and stage not in stages.data["stages"]:
                    stages.stage_done(stage, "up to date", 0.0)
                _record_units(stage, plan, cfg, run, stages)
                continue
            con.rule(f"[bold]{stage}[/]: {', '.join(s.name for s in todo)}")
            t0 = time.perf_counter()
            if executor is None and stage != "report":
                executor = make_executor(cfg, run, res)
                if executor.name != "local":
                    con.print(f"executor: {executor.name}")
            _run_stage(stage, todo, plan, cfg, run, executor, stages, resume=resume, force=force,
                       progress=progress)
            _record_units(stage, plan, cfg, run, stages)
            dt = time.perf_counter() - t0
            stages.stage_done(stage, "done", dt)
            est = sum(s.estimate_s for s in todo)
            con.print(f"{stage}: done in {duration(dt)}" + (f" (estimated ~{duration(est)})" if est else ""))
            if after_stage is not None:
                after_stage(stage)
        con.print(f"[bold]done[/] in {duration(time.perf_counter() - t_all)}: {run / 'report.md'}")
        _print_table(run)
    finally:
        try:
            if executor is not None:
                executor.close()
        finally:
            lock.release()
    return plan


def _run_stage(stage: str, todo: list[Step], plan: Plan, cfg: RunConfig, run: Path, executor: Executor | None,
               stages: Stages, *, resume: bool, force: bool, progress: bool) -> None:
    if stage in ("train", "baselines"):
        for s in todo:
            folder = run / ("adapters" if stage == "train" else "baselines") / s.name
            if s.status == "redo" and folder.exists():
                log.info("%s: %s; retraining it", folder, s.reason)
                shutil.rmtree(folder)
        if stage == "train":
            jobs = [TrainJob("single", tuple(plan.objectives))]
        else:
            jobs = [TrainJob(s.name, tuple(plan.objectives)) for s in todo]
        executor.train(jobs, resume=resume, progress=progress)
    elif stage == "search":
        from emorl.search.runner import search_run

        def objective(mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None) -> Any:
            return executor.search_objective(mode, names, prompts, seeds)

        for s in todo:
            try:
                search_run(run, cfg, mode=s.name, resume=s.status == "resume", fresh=s.status != "resume",
                           progress=progress, names=list(plan.objectives), objective=objective)
            except EmorlError as e:
                if s.status != "resume":
                    raise
                log.warning("cannot resume the %s search (%s); starting it over", s.name, e)
                search_run(run, cfg, mode=s.name, fresh=True, progress=progress, names=list(plan.objectives),
                           objective=objective)
            stages.record(f"search/{s.name}", settings=search_settings(cfg, s.name, _adapter_ids(plan, run)))
    elif stage == "route":
        from emorl.router import fit_run

        fit_run(run, cfg, base=executor.res.base, rewards=executor.res.rewards, fresh=force)
    elif stage == "evaluate":
        from emorl.evaluate import evaluate_run

        evaluate_run(run, cfg, plan.methods, base=executor.res.base, rewards=executor.res.rewards, progress=progress,
                     force=force, decode=executor.decode_methods)
    elif stage == "front":
        from emorl.front import front_run
        from emorl.pipeline.plan import front_settings

        front_run(run, cfg, base=executor.res.base, rewards=executor.res.rewards, progress=progress, force=force)
        stages.record("front", settings=front_settings(cfg), results=file_hash(run / "eval" / "results.json"))
    else:
        from emorl.report import write_report

        write_report(run)
        stages.record("report", results=file_hash(run / "eval" / "results.json"),
                      front=file_hash(run / "front" / "front.json"))


def _adapter_ids(plan: Plan, run: Path) -> dict[str, str | None]:
    return {o: adapter_id(run / "adapters" / o) for o in plan.objectives}


def _record_units(stage: str, plan: Plan, cfg: RunConfig, run: Path, stages: Stages) -> None:
    """Remember the settings every adapter of a finished stage was made (or accepted) with."""
    if stage not in ("train", "baselines"):
        return
    for s in plan.stage(stage):
        folder = run / ("adapters" if stage == "train" else "baselines") / s.name
        objs = [s.name] if stage == "train" else plan.objectives
        stages.record(f"train/{s.name}", settings=train_settings(cfg, s.name, objs), adapter=adapter_id(folder))


def _print_table(run: Path) -> None:
    from emorl.report.tables import markdown
    from emorl.utils import console

    p = run / "results.json"
    if p.exists():
        t = json.loads(p.read_text())["tables"]["comparison"]
        console().print(markdown(t["columns"], t["rows"]), markup=False, highlight=False)


# ------------------------------------------------------------------------------------------- CLI

def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_config_args

    p = sub.add_parser("run", help="the whole study: train, baselines, search, evaluate, report",
                       description="The whole study in one command: train the K objective adapters (EMORL) and the "
                                   "baselines, search the mixing weights, evaluate every method the same way, and "
                                   "write RUN/report.md. Each stage is skipped when its output is up to date; see "
                                   "docs/run.md.")
    add_config_args(p)
    p.add_argument("--output", help="run folder (default: runs/<preset>; with no --config/--preset, a folder that "
                                    "holds a config.yaml is continued with that config)")
    p.add_argument("--seeds", type=int, help="evaluate over seeds 0..N-1 (sampled decoding; greedy decodes once)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its checkpoint or log")
    p.add_argument("--force", action="store_true", help="redo every stage, even those that are up to date")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, then stop")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every available core)")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where the work runs: this process (default) or Ray tasks/actors (pip install 'emorl[ray]')")
    p.add_argument("--ray-address", help="Ray cluster to join (auto, HOST:PORT); default: start a local Ray instance")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def resolve(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    from emorl.cli_common import config_source, eval_overrides
    from emorl.config import load_config

    overrides = [*args.overrides, *eval_overrides(args)]
    if getattr(args, "executor", None):
        overrides.append(f"executor.kind={args.executor}")
    if getattr(args, "ray_address", None):
        overrides += [f"executor.address={args.ray_address}"] + ([] if args.executor else ["executor.kind=ray"])
    src = config_source(args)
    if src is None:
        run = Path(args.output or "runs/default")
        if (run / "config.yaml").exists():
            return load_config(str(run / "config.yaml"), overrides), run
        src = "default"
    cfg = load_config(src, overrides)
    return cfg, Path(args.output or cfg.output or f"runs/{Path(str(src)).stem}")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads, by default every available core; returns the number set.

    A shared CPU once made OpenMP threads 20-60x slower (docs/run.md) because they spin-wait for each other; the
    ``emorl`` entry point sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads, which removes that cost, so there is
    no load-average rule any more. ``--threads N`` still overrides."""
    import torch

    if threads is not None and threads < 1:
        raise EmorlError(f"--threads must be >= 1, got {threads}")
    n = threads or available_cores()
    torch.set_num_threads(n)
    log.debug("torch CPU threads: %d (OMP_WAIT_POLICY=%s)", n, __import__("os").environ.get("OMP_WAIT_POLICY"))
    return n


def main(args: argparse.Namespace) -> int:
    from emorl.utils import attach_log_file

    cfg, run = resolve(args)
    if not args.dry_run:
        attach_log_file(run / "logs" / "run.log")
    set_threads(args.threads)
    run_pipeline(cfg, run, resume=args.resume, force=args.force, progress=not args.no_progress,
                 dry_run=args.dry_run)
    return 0

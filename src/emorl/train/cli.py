"""``emorl train``: RL fine-tuning of one adapter per objective (EMORL) or of a baseline policy."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emorl.utils import EmorlError

log = logging.getLogger("emorl.train")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from emorl.cli_common import add_config_args

    p = sub.add_parser("train", help="train one LoRA adapter per objective (or a baseline) with k-SCST",
                       description=__doc__)
    add_config_args(p)
    p.add_argument("--run", help="an existing run folder: reuse its config.yaml (e.g. to add an objective)")
    p.add_argument("--output", help="run folder to write (default: runs/<preset or config name>)")
    p.add_argument("--objectives", help="comma-separated objectives to train (default: all in the config)")
    p.add_argument("--strategy", choices=["single", "uniform", "fixed", "dynaopt", "gdpo"],
                   help="single = EMORL; uniform / fixed / dynaopt / gdpo = one-policy baselines")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")
    p.add_argument("--force", action="store_true", help="retrain adapters that are already finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def resolve_run(args: argparse.Namespace) -> tuple[object, Path]:
    """Config + run folder from --run / --config / --preset / --output and the overrides."""
    from emorl.cli_common import config_source
    from emorl.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "objectives", None):
        objs = [o.strip() for o in args.objectives.split(",") if o.strip()]
        overrides.append(f"train.objectives=[{', '.join(objs)}]")
    if getattr(args, "strategy", None):
        overrides.append(f"train.strategy={args.strategy}")
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "config.yaml").exists():
            raise EmorlError(f"--run {run_dir}: no config.yaml there; train a run first, or use --output")
        if config_source(args):
            raise EmorlError("--run reuses the run's config.yaml; don't combine it with --config/--preset")
        cfg = load_config(str(run_dir / "config.yaml"), overrides)
    else:
        src = config_source(args)
        cfg = load_config(src, overrides)
        out = args.output or cfg.output or f"runs/{Path(str(src or 'default')).stem}"
        run_dir = Path(out)
    return cfg, run_dir


def run(args: argparse.Namespace) -> int:
    from emorl.train.trainer import Trainer
    from emorl.utils import console

    cfg, run_dir = resolve_run(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    _attach_log_file(run_dir / "logs" / "train.log")
    cfg.output = str(run_dir)
    if args.run:  # --objectives/--strategy pick what this call trains; the run keeps all its objectives
        import dataclasses

        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objectives=None, strategy="single")).save(
            run_dir / "config.yaml")
    else:
        cfg.save(run_dir / "config.yaml")
    t = cfg.train
    console().print(f"[bold]emorl train[/] strategy={t.strategy} objectives={cfg.trained_objectives()} "
                    f"model={cfg.model.name} -> {run_dir}\n  {t.batch_size} prompts x k={t.k} replies per step, "
                    f"up to {t.max_steps} steps, validation every {t.val_every} steps on {t.val_prompts} prompts")
    trainer = Trainer(cfg, run_dir, progress=not args.no_progress, force=args.force)
    infos = trainer.train(resume=args.resume)
    if not infos and trainer.stopped:
        return 130
    for name, info in infos.items():
        first, last = (info.curve[0]["value"], info.curve[-1]["value"]) if info.curve else (float("nan"),) * 2
        console().print(f"  {name:>12}: steps {info.steps}, prompts {info.prompts_consumed}, "
                        f"{info.wall_time_s:.0f} s, validation {first:.3f} -> {last:.3f} "
                        f"({info.extra.get('stop_reason', '')})")
    return 0


def _attach_log_file(path: Path) -> None:
    from emorl.utils import attach_log_file

    attach_log_file(path)

"""Checkpoint and resume of a :class:`~emorl.train.trainer.Trainer`: what is saved, and what may change.

The tensors and RNG states go through :mod:`emorl.train.checkpoint`; this module adds the trainer's JSON state
(per-policy steps, data positions, curves, bandit state) and the config signature a resume must match.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from emorl.train.checkpoint import load_checkpoint, save_checkpoint
from emorl.utils import EmorlError

if TYPE_CHECKING:
    from emorl.train.trainer import Trainer

log = logging.getLogger("emorl.train")

# config keys that may change between a checkpoint and its resume (budgets and bookkeeping only)
RESUMABLE_CHANGES = {"max_steps", "max_prompts", "checkpoint_every", "log_every", "report_to"}


def config_signature(tr: Trainer) -> dict[str, Any]:
    """The settings a checkpoint was written under, minus :data:`RESUMABLE_CHANGES`."""
    d = tr.cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    return {k: d[k] for k in ("model", "lora", "data", "train")} | {
        "objectives": {o: tr.cfg.objectives[o] for o in tr.objectives}}


def check_signature(tr: Trainer, old: dict[str, Any]) -> None:
    """Refuse a checkpoint written under other settings (beyond :data:`RESUMABLE_CHANGES`), naming them."""
    sig = config_signature(tr)
    diff = sorted(f"{s}.{k}" for s in sig for k in set(sig[s]) | set(old.get(s, {}))
                  if isinstance(sig[s], dict) and sig[s].get(k) != old.get(s, {}).get(k))
    if diff:
        raise EmorlError(f"cannot resume from {tr.ckpt_dir}: the config changed in {', '.join(diff)}. Restore "
                         f"those values, or train into a new run folder")


def write_checkpoint(tr: Trainer) -> None:
    save_checkpoint(tr.ckpt_dir, params={p.name: p.params for p in tr.policies},
                    optimizers={p.name: p.optimizer for p in tr.policies}, state=tr.state_dict())


def resume(tr: Trainer) -> bool:
    """Load ``tr.ckpt_dir`` into the set-up trainer; False when there is no checkpoint."""
    if not (tr.ckpt_dir / "state.json").exists():
        log.info("no checkpoint in %s: starting from scratch", tr.ckpt_dir)
        return False
    state = load_checkpoint(tr.ckpt_dir, params={p.name: p.params for p in tr.policies},
                            optimizers={p.name: p.optimizer for p in tr.policies})
    tr.load_state_dict(state)
    log.info("resumed from %s at step %s", tr.ckpt_dir, {p.name: p.step for p in tr.policies})
    return True

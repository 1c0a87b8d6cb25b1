"""Where training metrics go: a JSONL file in the run folder (always), optional TensorBoard / W&B, progress bars.

Metric names follow TRL: ``rewards/<objective>/mean``, prefixed by the policy (``empathy/rewards/empathy/mean``)
when several policies train together.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emorl.utils import EmorlError, append_jsonl

log = logging.getLogger("emorl.train")


class MetricsLogger:
    def __init__(self, path: Path, report_to: list[str], run_name: str, config: dict[str, Any] | None = None):
        self.path = path
        self.tb = None
        self.wandb = None
        for target in report_to:
            if target == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise EmorlError("train.report_to: 'tensorboard' needs `pip install tensorboard`") from e
                self.tb = SummaryWriter(log_dir=str(path.parent / "tensorboard" / run_name))
            elif target == "wandb":
                try:
                    import wandb
                except ImportError as e:
                    raise EmorlError("train.report_to: 'wandb' needs `pip install wandb` (and a login)") from e
                self.wandb = wandb.init(project="emorl", name=run_name, config=config, reinit=True)
            else:
                raise EmorlError(f"train.report_to: unknown target {target!r}; use 'tensorboard' or 'wandb'")

    def log(self, record: dict[str, Any], step: int) -> None:
        append_jsonl(self.path, record)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """One rich progress bar per policy (step / budget, last rewards, prompts consumed, ETA); silent if disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None
        self._tasks: dict[str, Any] = {}

    @contextlib.contextmanager
    def run(self) -> Iterator[Progress]:
        if not self.enabled:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        from emorl.utils import console

        self._p = RichProgress(
            TextColumn("[bold]{task.fields[name]:>12}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console(),
            transient=False)
        with self._p:
            yield self
        self._p = None

    def add(self, name: str, total: int, completed: int = 0) -> None:
        if self._p is not None:
            self._tasks[name] = self._p.add_task(name, total=total, completed=completed, name=name, info="")

    def update(self, name: str, completed: int, info: str) -> None:
        if self._p is not None and name in self._tasks:
            self._p.update(self._tasks[name], completed=completed, info=info)

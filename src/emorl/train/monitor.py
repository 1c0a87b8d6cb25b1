"""Where training metrics go: a JSONL file in the run folder (always), optional TensorBoard / W&B; progress bars are
:mod:`emorl.progress` (re-exported here).

Metric names follow TRL: ``rewards/<objective>/mean``, prefixed by the policy (``empathy/rewards/empathy/mean``)
when several policies train together.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from emorl.progress import PlainBar, Progress, progress_bar  # noqa: F401 - re-exported for the trainer and tests
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


"""Where ``emorl run``'s work runs: in this process (``local``, the default) or on a Ray cluster (``ray``).

The pipeline decides *what* to do; an executor only decides *where*. It hands an executor three kinds of
independent work, and nothing else in the code knows which executor runs:

- :meth:`Executor.train` — training jobs (the K objective adapters, the one-policy baselines);
- :meth:`Executor.search_objective` — the weight search's ``objective(points) -> scores`` for one mode;
- :meth:`Executor.decode_methods` — every evaluation method's replies, for every seed.

Both executors give the same adapters and scores for the same config and seeds (tested): training is
reproducible per adapter whichever others train beside it, and a weight point decodes the same in any batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from emorl.executors.base import KINDS, Decoded, Executor, TrainJob

if TYPE_CHECKING:
    from emorl.config import RunConfig
    from emorl.executors.local import Resources


def make_executor(cfg: RunConfig, run: Path, res: Resources | None = None) -> Executor:
    """The executor ``cfg.executor.kind`` names, for the run folder ``run``."""
    from emorl.executors.local import LocalExecutor, Resources

    res = res or Resources(cfg)
    if cfg.executor.kind == "ray":
        from emorl.executors.ray_backend import RayExecutor

        return RayExecutor(cfg, run, res)
    return LocalExecutor(cfg, run, res)


__all__ = ["KINDS", "Decoded", "Executor", "TrainJob", "make_executor"]

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

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emorl.config import RunConfig
    from emorl.evaluate import MethodSpec
    from emorl.executors.local import Resources

KINDS = ("local", "ray")


@dataclass(frozen=True)
class TrainJob:
    """``strategy`` ``single``: train one adapter per objective in ``objectives``; a baseline strategy (``uniform``,
    ``dynaopt``, ``fixed``): one policy on all the run's objectives."""

    strategy: str
    objectives: tuple[str, ...]


# (seed, replies, reply lengths in tokens, decode seconds) for one method and seed
Decoded = tuple[int, list[str], list[int], float]


class Executor(Protocol):
    name: str
    res: Resources  # the driver's model, rewards and data (the driver scores evaluation replies)

    def train(self, jobs: list[TrainJob], *, resume: bool, progress: bool) -> None:
        """Train every job into the run folder; finished adapters are skipped, ``resume`` continues checkpoints."""

    def search_objective(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None
                         ) -> Any:
        """A search objective (``objective(points) -> [Score]``, ``.degenerate()``) over the run's adapters."""

    def decode_methods(self, specs: list[MethodSpec], prompts: list[str], seeds: list[int]
                       ) -> Iterator[tuple[MethodSpec, list[Decoded]]]:
        """Each method's replies for every seed, method by method (in any order)."""

    def close(self) -> None:
        """Release workers (and a Ray instance this executor started)."""


def make_executor(cfg: RunConfig, run: Path, res: Resources | None = None) -> Executor:
    """The executor ``cfg.executor.kind`` names, for the run folder ``run``."""
    from emorl.executors.local import LocalExecutor, Resources

    res = res or Resources(cfg)
    if cfg.executor.kind == "ray":
        from emorl.executors.ray_backend import RayExecutor

        return RayExecutor(cfg, run, res)
    return LocalExecutor(cfg, run, res)


__all__ = ["KINDS", "Decoded", "Executor", "TrainJob", "make_executor"]

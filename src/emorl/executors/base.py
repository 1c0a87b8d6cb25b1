"""The executor interface: the work an executor is handed (:class:`TrainJob`, :data:`Decoded`) and what it must do
(:class:`Executor`). The backends (``local``, ``ray_backend``) import this, never the package's factory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from emorl.executors.local import Resources
    from emorl.methods import MethodSpec

KINDS = ("local", "ray")


@dataclass(frozen=True)
class TrainJob:
    """``strategy`` ``single``: train one adapter per objective in ``objectives``; a baseline strategy (``uniform``,
    ``dynaopt``, ``fixed``): one policy on all the run's objectives."""

    strategy: str
    objectives: tuple[str, ...]


# (seed, replies, reply lengths in tokens, decode seconds, finish reasons "eos"/"stop"/"length", the first kl_rows
# replies' KL to the base as an emorl.divergence.ReplyKL or None) for one method and seed (a decode without the fifth
# item stores no finish reasons; without the sixth, no KL)
Decoded = tuple[int, list[str], list[int], float, list[str], Any]


class Executor(Protocol):
    name: str
    res: Resources  # the driver's model, rewards and data (the driver scores evaluation replies)

    def train(self, jobs: list[TrainJob], *, resume: bool, progress: bool) -> None:
        """Train every job into the run folder; finished adapters are skipped, ``resume`` continues checkpoints."""

    def search_objective(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None
                         ) -> Any:
        """A search objective (``objective(points) -> [Score]``, ``.degenerate()``) over the run's adapters."""

    def decode_methods(self, specs: list[MethodSpec], prompts: list[str], seeds: list[int], kl_rows: int = 0
                       ) -> Iterator[tuple[MethodSpec, list[Decoded]]]:
        """Each method's replies for every seed, method by method (in any order); with ``kl_rows`` = n, the first
        n replies' KL to the base from the same decode (:meth:`emorl.decoding.Decoder.decode_finish`)."""

    def close(self) -> None:
        """Release workers (and a Ray instance this executor started)."""


__all__ = ["KINDS", "Decoded", "Executor", "TrainJob"]

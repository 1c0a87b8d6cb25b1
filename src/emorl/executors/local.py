"""The in-process executor: everything runs here, one model loaded once and shared by every stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emorl.config import RunConfig
from emorl.executors.base import Decoded, TrainJob


class Resources:
    """The base model, rewards and data splits, loaded once and only when a stage needs them."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._base: Any = None
        self._rewards: dict[str, Any] | None = None
        self._splits: Any = None

    @property
    def base(self) -> Any:
        if self._base is None:
            from emorl.models import load_base

            self._base = load_base(self.cfg.model)
        return self._base

    @property
    def rewards(self) -> dict[str, Any]:
        if self._rewards is None:
            from emorl.rewards import build_rewards

            self._rewards = build_rewards(self.cfg.objectives, self.base)
        return self._rewards

    @property
    def splits(self) -> Any:
        if self._splits is None:
            from emorl.data import load_splits

            self._splits = load_splits(self.cfg.data)
        return self._splits


def job_config(cfg: RunConfig, job: TrainJob) -> RunConfig:
    """The config one Trainer runs for ``job`` (a subset of objectives only for ``single``)."""
    objs = list(job.objectives) if job.strategy == "single" and list(job.objectives) != list(cfg.objectives) else None
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy=job.strategy, objectives=objs))


class LocalExecutor:
    """Train, search and decode in this process. The K objective adapters train together (one batched rollout
    per step for all of them), and so do the baselines; the result is the same as training each alone."""

    name = "local"

    def __init__(self, cfg: RunConfig, run: Path, res: Resources) -> None:
        self.cfg, self.run, self.res = cfg, Path(run), res
        self._ensemble: Any = None

    def train(self, jobs: list[TrainJob], *, resume: bool, progress: bool) -> None:
        from emorl.train.trainer import Trainer

        baselines = [j.strategy for j in jobs if j.strategy != "single"]
        groups = [(j, None) for j in jobs if j.strategy == "single"]
        if baselines:  # the baselines train together too: one batched rollout per step for all of them
            groups.append((next(j for j in jobs if j.strategy != "single"), baselines))
        for job, strategies in groups:
            trainer = Trainer(job_config(self.cfg, job), self.run, base=self.res.base, rewards=self.res.rewards,
                              splits=self.res.splits, progress=progress, strategies=strategies)
            trainer.train(resume=resume)
            if trainer.stopped:
                raise KeyboardInterrupt

    def search_objective(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None
                         ) -> Any:
        from emorl.ensemble.model import EnsembleModel
        from emorl.search.objective import build_objective

        if self._ensemble is None or list(self._ensemble.names) != list(names):
            self._ensemble = EnsembleModel(self.res.base, {o: self.run / "adapters" / o for o in names})
        sc = self.cfg.search
        return build_objective(self._ensemble, prompts, self.res.rewards, mode, sc, seeds)

    def decode_methods(self, specs: list[Any], prompts: list[str], seeds: list[int], kl_rows: int = 0
                       ) -> Iterator[tuple[Any, list[Decoded]]]:
        from emorl.decoding import Decoder, decode_with
        from emorl.methods import any_adapter

        yield from decode_with(Decoder(self.res.base, self.cfg.eval.generation, any_adapter(self.run, specs)))(
            specs, prompts, seeds, kl_rows)

    def close(self) -> None:
        self._ensemble = None

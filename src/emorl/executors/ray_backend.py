"""The Ray executor: training jobs as Ray tasks, search points and evaluation methods on Ray actors.

- **Training**: one task per objective adapter (and one per baseline), with the resources of
  ``executor.num_cpus`` / ``executor.num_gpus`` (fractions share a GPU). A task trains in a scratch folder on its
  worker and sends every checkpoint to a small store actor; the driver mirrors each one into
  ``RUN/checkpoints/<job>/`` and, when the task returns, writes the finished adapter into the run folder. A worker
  killed mid-task is rerun by Ray (``executor.max_retries``) and resumes from the store's last checkpoint; a killed
  driver is continued with ``emorl run --resume``, which hands the mirrored checkpoints back to the tasks.
- **Search**: each worker actor loads the base model, the adapters (shipped from the driver as bytes) and the
  rewards once; the new points of a round are split across the workers and scored there.
- **Evaluation**: the methods are decoded in parallel on the same actors; the driver scores and writes.

The driver owns the run folder: workers return data, never write files the driver reads, so a multi-node
cluster works without a shared filesystem (each node needs the model assets, as any worker does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emorl.config import RunConfig
from emorl.executors.base import Decoded, TrainJob
from emorl.executors.files import Files, pack, replace_folder, unpack
from emorl.executors.local import Resources, job_config
from emorl.utils import EmorlError, atomic_write_bytes

log = logging.getLogger("emorl.ray")
ENV_PASSED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "EMORL_CACHE",
              "OMP_WAIT_POLICY")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EmorlError("executor 'ray' needs Ray: pip install 'emorl[ray]' (or ./install.sh ray); "
                         "or use the default executor.kind=local") from None
    return ray


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _finished(folder: Path) -> bool:
    p = folder / "emorl.json"
    return p.exists() and bool(json.loads(p.read_text()).get("extra", {}).get("finished"))


def _step_of(files: Files) -> int:
    """The largest policy step recorded in a packed checkpoint (for progress)."""
    for rel, data in files.items():
        if rel.endswith("state.json"):
            st = json.loads(data)
            return max((p.get("step", 0) for p in st.get("trainer", {}).get("policies", {}).values()), default=0)
    return 0


# ------------------------------------------------------------------------------------------- remote code

class CheckpointStore:
    """Holds each training job's latest checkpoint (packed files) and the worker process running it."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, int, Files]] = {}  # job -> (version, step, files)
        self.pids: dict[str, int] = {}
        self.version = 0

    def put(self, key: str, step: int, files: Files) -> int:
        self.version += 1
        self.latest[key] = (self.version, step, files)
        return self.version

    def get(self, key: str) -> Files | None:
        return self.latest[key][2] if key in self.latest else None

    def since(self, version: int) -> dict[str, tuple[int, int, Files]]:
        return {k: v for k, v in self.latest.items() if v[0] > version}

    def started(self, key: str, pid: int) -> None:
        self.pids[key] = pid

    def workers(self) -> dict[str, int]:
        return dict(self.pids)


def train_task(cfg_dict: dict[str, Any], strategy: str, objective: str | None, key: str, store: Any,
               splits: Any) -> Files:
    """One training job on a worker: resume from the store's checkpoint if there is one, push every new
    checkpoint to the store, return the finished adapter, curves and metrics log as packed files. The data splits
    come from the driver (a worker on another node may not have the data files)."""
    import ray

    from emorl.train.trainer import Trainer

    cfg = RunConfig.from_dict(cfg_dict)
    _threads(cfg.executor.num_cpus)
    tcfg = job_config(cfg, TrainJob(strategy, (objective,) if objective else tuple(cfg.objectives)))
    with tempfile.TemporaryDirectory(prefix="emorl-task-") as tmp:
        run = Path(tmp)
        trainer = Trainer(tcfg, run, splits=splits, progress=False, callbacks=[])
        tag_files = [f"checkpoints/{trainer.tag}", f"logs/{trainer.tag}.jsonl"]
        start = ray.get(store.get.remote(key))
        if start:
            unpack(start, run)
        ray.get(store.started.remote(key, os.getpid()))
        seen = [None]

        def push(tr: Trainer) -> None:  # after every step: a new checkpoint goes to the store before training on
            st = tr.ckpt_dir / "state.json"
            stamp = st.stat().st_mtime_ns if st.exists() else None
            if stamp != seen[0]:
                seen[0] = stamp
                files = pack(run, tag_files)
                ray.get(store.put.remote(key, _step_of(files), files))

        trainer.callbacks.append(push)
        trainer.train(resume=bool(start))
        out = f"adapters/{objective}" if strategy == "single" else f"baselines/{strategy}"
        if trainer.stopped or not _finished(run / out):  # never hand back an unfinished adapter
            raise RuntimeError(f"training job {key} stopped before it finished")
        return pack(run, [out, f"curves/{trainer.tag}.json", f"logs/{trainer.tag}.jsonl"])


class Worker:
    """A search/evaluation worker: the base model, the run's adapters and the rewards, loaded once."""

    def __init__(self, cfg_dict: dict[str, Any], files: Files) -> None:
        from emorl.models import load_base
        from emorl.rewards import build_rewards

        self.cfg = RunConfig.from_dict(cfg_dict)
        _threads(self.cfg.executor.num_cpus)
        self.dir = Path(tempfile.mkdtemp(prefix="emorl-worker-"))
        try:
            unpack(files, self.dir)
            self.base = load_base(self.cfg.model)
            self.rewards = build_rewards(self.cfg.objectives, self.base)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._ensembles: dict[tuple[str, ...], Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def _objective(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None) -> Any:
        from emorl.ensemble.model import EnsembleModel
        from emorl.search.objective import build_objective

        key = tuple(names)
        if key not in self._ensembles:
            self._ensembles[key] = EnsembleModel(self.base, {o: self.dir / "adapters" / o for o in names})
        sc = self.cfg.search
        return build_objective(self._ensembles[key], prompts, self.rewards, mode, sc, seeds)

    def score(self, mode: str, names: list[str], prompts: list[str], points: np.ndarray,
              seeds: list[int] | None = None) -> list[tuple[float, dict[str, float], dict[str, list[float]]]]:
        return [(s.aggregate, s.scores, s.per_prompt) for s in self._objective(mode, names, prompts, seeds)(points)]

    def degenerate(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None
                   ) -> tuple[float, dict[str, float]]:
        s = self._objective(mode, names, prompts, seeds).degenerate()
        return s.aggregate, s.scores

    def decode(self, spec: Any, prompts: list[str], seeds: list[int], run: str, any_adapter: dict[str, str] | None,
               kl_rows: int = 0) -> tuple[Any, list[Decoded]]:
        """One method's replies for every seed; the spec's adapter folders are mapped into this worker's copy."""
        import dataclasses

        from emorl.decoding import Decoder, decode_with

        def here(p: Any) -> Path:
            return self.dir / Path(p).relative_to(run)

        local = dataclasses.replace(spec, adapters={n: here(f) for n, f in spec.adapters.items()})
        decoder = Decoder(self.base, self.cfg.eval.generation,
                          {n: here(f) for n, f in any_adapter.items()} if any_adapter else None)
        decoder._ens = self._ensembles  # reuse loaded ensembles across methods
        (_, out), = decode_with(decoder)([local], prompts, seeds, kl_rows)
        return spec, out

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class RayObjective:
    """The search objective on the driver: a batch of points is split across the workers, scored there."""

    def __init__(self, workers: list[Any], mode: str, names: list[str], prompts: list[str],
                 seeds: list[int] | None = None) -> None:
        self.workers, self.mode, self.names, self.prompts = workers, mode, list(names), list(prompts)
        self.seeds = seeds

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def parallelism(self) -> int:
        """Workers scoring at once: the search hands this objective that many batches of points per call."""
        return len(self.workers)

    def __call__(self, points: np.ndarray) -> list[Any]:
        import ray

        from emorl.search.evaluator import Score

        points = np.asarray(points, dtype=np.float64)
        chunks = [c for c in np.array_split(np.arange(len(points)), min(len(self.workers), len(points))) if len(c)]
        refs = [w.score.remote(self.mode, self.names, self.prompts, points[c], self.seeds)
                for w, c in zip(self.workers, chunks, strict=False)]
        return [Score(a, s, pp) for part in ray.get(refs) for a, s, pp in part]

    def degenerate(self) -> Any:
        import ray

        from emorl.search.evaluator import Score

        a, s = ray.get(self.workers[0].degenerate.remote(self.mode, self.names, self.prompts, self.seeds))
        return Score(a, s)


# ------------------------------------------------------------------------------------------- the executor

class RayExecutor:
    """Spread ``emorl run`` over a Ray cluster (``executor.address``) or a Ray instance started for the run."""

    name = "ray"

    def __init__(self, cfg: RunConfig, run: Path, res: Resources) -> None:
        self.ray = ray = import_ray()
        self.cfg, self.run, self.res = cfg, Path(run), res
        self.ex = cfg.executor
        self._owns = False
        env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
        if not ray.is_initialized():
            kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False,
                                  "configure_logging": False}
            if self.ex.address:
                ray.init(address=self.ex.address, **kw)
            else:
                ray.init(address="local", include_dashboard=False, **kw)  # never a cluster found in the env
                self._owns = True
        self._workers: list[Any] = []
        self._shipped: dict[str, tuple[int, int]] | None = None
        self.on_checkpoint: Callable[[str, int, int | None], None] | None = None  # (job, step, worker pid): tests

    # -------------------------------------------------------------------------------- training
    def _opts(self) -> dict[str, Any]:
        return {"num_cpus": self.ex.num_cpus, "num_gpus": self.ex.num_gpus}

    def train(self, jobs: list[TrainJob], *, resume: bool, progress: bool) -> None:
        from emorl.progress import Progress

        ray = self.ray
        tasks: list[tuple[str, str, str | None, str]] = []  # key, strategy, objective, output folder
        for j in jobs:
            for o in (j.objectives if j.strategy == "single" else (None,)):
                out = f"adapters/{o}" if o else f"baselines/{j.strategy}"
                if not _finished(self.run / out):
                    tasks.append((f"single-{o}" if o else j.strategy, j.strategy, o, out))
        if not tasks:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        store = ray.remote(num_cpus=0)(CheckpointStore).options(scheduling_strategy=here).remote()  # dies with us
        for key, *_ in tasks:
            ck = self.run / "checkpoints" / key
            if resume and (ck / "state.json").exists():
                files = pack(self.run, [f"checkpoints/{key}", f"logs/{key}.jsonl"])
                ray.get(store.put.remote(key, _step_of(files), files))
                log.info("%s: resuming from %s (step %d)", key, ck, _step_of(files))
        remote = ray.remote(train_task).options(max_retries=self.ex.max_retries, retry_exceptions=False,
                                                **self._opts())
        cfg_ref, splits_ref = ray.put(self.cfg.to_dict()), ray.put(self.res.splits)
        pending = {remote.remote(cfg_ref, s, o, key, store, splits_ref): (key, out) for key, s, o, out in tasks}
        version, t = 0, self.cfg.train
        try:
            with Progress(progress).run() as bars:
                for key, *_ in tasks:
                    bars.add(key, t.max_steps)
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    new = ray.get(store.since.remote(version))
                    pids = ray.get(store.workers.remote()) if new and self.on_checkpoint else {}
                    for key, (v, step, files) in new.items():
                        version = max(version, v)
                        self._mirror(key, files)
                        bars.update(key, step, f"checkpoint at step {step}")
                        if self.on_checkpoint is not None:
                            self.on_checkpoint(key, step, pids.get(key))
                    for ref in ready:
                        key, out = pending.pop(ref)
                        try:
                            files = ray.get(ref)
                        except ray.exceptions.RayError as e:  # failed for good (an error, or out of retries)
                            cause = getattr(e, "cause", None) or e
                            raise EmorlError(f"training job {key} failed on a Ray worker: {cause}") from e
                        self._write_result(key, out, files)
                        bars.update(key, t.max_steps, "done")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            ray.kill(store)

    def _mirror(self, key: str, files: Files) -> None:
        """A task's checkpoint, copied into the run folder: what ``--resume`` continues from if the driver dies."""
        replace_folder(files, self.run, f"checkpoints/{key}")
        log_rel = f"logs/{key}.jsonl"
        if log_rel in files:
            atomic_write_bytes(self.run / log_rel, files[log_rel])

    def _write_result(self, key: str, out: str, files: Files) -> None:
        """Curves and metrics first, the adapter (what marks the job finished) last, then its checkpoint goes."""
        for rel, data in files.items():
            if not rel.startswith(out + "/"):
                atomic_write_bytes(self.run / rel, data)
        replace_folder(files, self.run, out)
        shutil.rmtree(self.run / "checkpoints" / key, ignore_errors=True)

    # -------------------------------------------------------------------------------- search and evaluation
    def _pool(self) -> list[Any]:
        """Worker actors holding the run's current adapters (recreated when the adapters on disk change)."""
        ray = self.ray
        folders = [p for sub in ("adapters", "baselines") for p in sorted((self.run / sub).glob("*"))
                   if p.is_dir() and not p.name.startswith(".")]
        stamp = {str(f): (g.stat().st_size, g.stat().st_mtime_ns) for f in folders for g in f.rglob("*") if g.is_file()}
        if self._workers and stamp == self._shipped:
            return self._workers
        self._close_workers()
        files = pack(self.run, [f.relative_to(self.run) for f in folders])
        n = self.ex.workers or self._default_workers()
        actor = ray.remote(Worker).options(max_restarts=2, max_task_retries=2, **self._opts())  # calls are pure
        ref = ray.put(files)
        cfg = self.cfg.to_dict()
        self._workers = [actor.remote(cfg, ref) for _ in range(n)]
        try:  # loaded (or failed) before any work is sent
            ray.get([w.pid.remote() for w in self._workers], timeout=1800)
        except ray.exceptions.GetTimeoutError:
            raise EmorlError(f"{n} Ray workers could not start within 30 min (each needs num_cpus="
                             f"{self.ex.num_cpus}, num_gpus={self.ex.num_gpus}; cluster: "
                             f"{ray.cluster_resources()}): lower executor.workers") from None
        self._shipped = stamp
        return self._workers

    def _default_workers(self) -> int:
        avail = self.ray.cluster_resources()
        by_cpu = int(avail.get("CPU", 1) // self.ex.num_cpus) if self.ex.num_cpus else 8
        by_gpu = int(avail.get("GPU", 0) // self.ex.num_gpus) if self.ex.num_gpus else 8
        return max(1, min(8, by_cpu, by_gpu))

    def search_objective(self, mode: str, names: list[str], prompts: list[str], seeds: list[int] | None = None
                         ) -> Any:
        return RayObjective(self._pool(), mode, names, prompts, seeds)

    def decode_methods(self, specs: list[Any], prompts: list[str], seeds: list[int], kl_rows: int = 0
                       ) -> Iterator[tuple[Any, list[Decoded]]]:
        from emorl.methods import any_adapter

        ray = self.ray
        workers = self._pool()
        anyad = any_adapter(self.run, specs)
        anyad_s = {n: str(f) for n, f in anyad.items()} if anyad else None
        pending = [workers[i % len(workers)].decode.remote(s, prompts, seeds, str(self.run), anyad_s, kl_rows)
                   for i, s in enumerate(specs)]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])

    # -------------------------------------------------------------------------------- shutdown
    def _close_workers(self) -> None:
        closing = [w.close.remote() for w in self._workers]
        with contextlib.suppress(Exception):  # a dead worker has nothing left to clean
            self.ray.wait(closing, num_returns=len(closing), timeout=30)
        for w in self._workers:
            self.ray.kill(w)
        self._workers, self._shipped = [], None

    def close(self) -> None:
        self._close_workers()
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()

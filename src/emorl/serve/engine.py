"""The model side of ``emorl serve``: one run loaded once, a decode thread that batches requests, and a side
worker (:mod:`emorl.serve.worker`) for ``/v1/score`` and the router.

:class:`Engine` loads the run's base, its K objective adapters and its one-policy baselines (``RUN/baselines/*``,
loaded as further adapters on the same model). Requests become :class:`Job` s (one
:class:`~emorl.ensemble.pairs.PairSpec` per choice); the decode thread is the only one that touches the model and
its tokenizer (the event loop parses requests with a tokenizer of its own). Two schedulers:

* ``step`` (default; :mod:`emorl.serve.scheduler`): iteration-level batching — every decode step admits waiting
  requests (within a KV byte budget, prefilled in chunks) and retires finished ones; every mode shares one batch.
* ``window`` (:mod:`emorl.serve.window`; the first design, kept for the benchmark): the oldest waiting job plus
  others that arrive while jobs keep coming form a batch once no job has arrived for ``max_gap_ms``, at most
  ``max_wait_ms`` after the oldest job's arrival or the end of the previous batch, whichever is later (or once
  ``max_batch_rows`` backbone rows are taken). Jobs with the same batch key — the mixing mode, and whether the
  base stream is needed — decode in ONE :func:`~emorl.ensemble.pairs.generate_pairs` call to the end of the
  batch's longest reply.

Finished replies are reported at once; a cancelled job is dropped before it starts or ends at the next step.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorl.ensemble.pairs import PairResult, PairSpec
from emorl.serve.batch import default_kv_budget
from emorl.serve.worker import Worker, route_error
from emorl.utils import EmorlError

log = logging.getLogger("emorl.serve")

BASELINES = ("uniform", "dynaopt", "gdpo", "fixed")
# serving's default reply length: the smallest at which >= 95% of the default run's replies (EMORL's searched weights
# and the base, test split) ended with EOS: 384 (23 of 24 each; bench/RESULTS.md, "Replies that finish")
DEFAULT_MAX_TOKENS = 384


class Overloaded(EmorlError):
    """The waiting queue is full: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(EmorlError):
    """One request's worst case does not fit the KV budget even alone (HTTP 400)."""


@dataclass
class ServedModel:
    """A servable ``model`` name: a mix of the K objective adapters, one trained policy, or the base."""

    name: str
    kind: str  # mix | adapter | base
    mode: str | None = None  # mix: its mode
    anchor: str | None = None  # mix: its weight rule ("base" anchored, "none" convex)
    adapter: str | None = None  # adapter: the adapter's name on the model
    label: str = ""
    free: bool = False  # model "emorl": the request may pick any mode and anchor


@dataclass
class Job:
    """One request's choices, decoded together in one batch. ``emit(event)`` is called from the scheduler thread
    with ("token", choice, id), ("finish", choice, PairResult), ("error", message) or ("done", None)."""

    key: str  # batch key: a mixing mode, "+base" when the batch needs the base stream; or "score"
    pairs: list[PairSpec]
    emit: Callable[[tuple[str, Any, Any]], None]
    rows: int = 1
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    stream: bool = False  # report every token (else only finished choices)
    results: list[PairResult | None] = field(default_factory=list)
    prompt_tokens: int = 0  # the prompt's length in tokens (chat template included): the KV budget's worst case
    finished: float | None = None


class Engine:
    """The loaded run and its scheduler (start with :meth:`start`, stop with :meth:`close`)."""

    def __init__(self, run: str | Path, *, max_batch_rows: int = 96, max_wait_ms: float = 100.0,
                 max_gap_ms: float = 10.0, max_tokens: int = 1024, device: str | None = None, base: Any = None,
                 scheduler: str = "step", kv_budget_mb: float | None = None, max_queue: int = 256,
                 prefill_chunk: int = 256, max_prompt_tokens: int | None = None,
                 default_max_tokens: int | None = None, max_prefill_tokens: int = 512,
                 prefix_cache: bool = True) -> None:
        from emorl.config import load_config
        from emorl.ensemble import EnsembleModel
        from emorl.models import check_same_base, load_adapters, load_base, read_adapter_info

        self.run = Path(run)
        if not (self.run / "config.yaml").exists():
            raise EmorlError(f"--run {run}: no config.yaml there (is it a run folder made by `emorl train`?)")
        if max_batch_rows < 1 or max_wait_ms < 0 or max_gap_ms < 0 or max_tokens < 1:
            raise EmorlError("--max-batch-rows and --max-tokens must be >= 1, --max-wait-ms and --max-gap-ms >= 0")
        if scheduler not in ("step", "window"):
            raise EmorlError(f"--scheduler {scheduler!r}: choose 'step' (per decode step) or 'window'")
        if max_queue < 1 or prefill_chunk < 1 or max_prefill_tokens < 1 or (kv_budget_mb is not None
                                                                              and kv_budget_mb <= 0):
            raise EmorlError("--max-queue, --prefill-chunk and --max-prefill-tokens must be >= 1, --kv-budget-mb > 0")
        self.cfg = load_config(self.run / "config.yaml")
        if device:
            self.cfg.model.device = device
        self.max_batch_rows, self.max_tokens = max_batch_rows, max_tokens
        self.max_wait_s, self.max_gap_s = max_wait_ms / 1000.0, max_gap_ms / 1000.0
        self.ens = EnsembleModel.from_run(self.run, base=base or load_base(self.cfg.model))
        self.objectives: list[str] = list(self.ens.names)
        extra = {}
        for b in BASELINES:
            folder = self.run / "baselines" / b
            if (folder / "adapter_model.safetensors").exists():
                check_same_base(self.ens.base, read_adapter_info(folder), folder)
                extra[b] = folder
        loaded = set(getattr(self.ens.base.model, "peft_config", {}))  # a base shared with another engine
        if any(b not in loaded for b in extra):
            load_adapters(self.ens.base, {b: f for b, f in extra.items() if b not in loaded})
        self.adapters: list[str] = self.objectives + list(extra)  # the weight order of every PairSpec
        self.methods = self._methods(list(extra))
        self.searched = self._searched()
        self.ens.verify_head()
        self._limits(max_prompt_tokens, default_max_tokens)
        self.scheduler = "window" if self.ens.base.is_seq2seq else scheduler  # step: causal backbones only
        self.max_queue, self.prefill_chunk, self.max_prefill_tokens = max_queue, prefill_chunk, max_prefill_tokens
        self.prefix_cache = prefix_cache  # reuse the system prompt's keys and values (emorl.serve.prefix)
        self.kv_budget = int(kv_budget_mb * 2**20) if kv_budget_mb else default_kv_budget(self.ens.device)
        self.request_tokenizer = copy.deepcopy(self.ens.tokenizer)  # the event loop's own (parse_chat, streaming)
        self.worker = Worker(self.run, self.cfg, self.objectives, str(self.ens.device))
        self.stats: dict[str, Any] = {"batches": 0, "jobs": 0, "pairs": 0, "cancelled": 0, "dropped_before_start": 0,
                                      "last_batch": None, "max_batch_jobs": 0}
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._cancel_inflight = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- run contents

    def route(self, statement: str) -> list[float]:
        """The router's weights for one client statement (``"weights": "auto"``), computed on the worker (the
        router loads there once, under a lock). Blocks: from the event loop use :meth:`route_async`."""
        try:
            return self.worker.route(statement).result()
        except EmorlError as e:
            raise route_error(e) from e

    async def route_async(self, statement: str) -> list[float]:
        import asyncio

        try:
            return await asyncio.wrap_future(self.worker.route(statement))
        except EmorlError as e:
            raise route_error(e) from e

    def _limits(self, max_prompt_tokens: int | None, default_max_tokens: int | None) -> None:
        """The prompt limit: the model's context minus ``max_tokens`` (``--max-prompt-tokens`` may lower it), not
        the training setting; and the default reply length."""
        lm = self.ens.stream.decoder.config
        self.context = int(getattr(lm, "max_position_embeddings", None) or getattr(lm, "n_positions", None) or 2048)
        if self.max_tokens >= self.context:
            self.max_tokens = self.context // 2
        self.prompt_limit = self.context - 1  # a request's own limit: the context minus its max_tokens
        if max_prompt_tokens is not None:
            if max_prompt_tokens < 8:
                raise EmorlError(f"--max-prompt-tokens {max_prompt_tokens}: give at least 8")
            self.prompt_limit = min(self.prompt_limit, max_prompt_tokens)
        self.default_max_tokens = min(default_max_tokens or DEFAULT_MAX_TOKENS, self.max_tokens)

    def _methods(self, baselines: list[str]) -> dict[str, ServedModel]:
        """Every method of ``emorl evaluate`` this run can serve, named as there."""
        from emorl.decoding import parse_mix
        from emorl.methods import METHODS, SINGLE, method_label

        out = {}
        for name, (kind, key) in METHODS.items():
            if kind == "ensemble":
                mode, anchor = parse_mix(str(key), self.cfg.search.anchor)
                out[name] = ServedModel(name, "mix", mode, anchor, label=method_label(name), free=name == "emorl")
        for b in baselines:
            out[b] = ServedModel(b, "adapter", "hidden", "base", b, method_label(b))
        for o in self.objectives:
            name = f"{SINGLE}{o}"
            out[name] = ServedModel(name, "adapter", "hidden", "base", o, method_label(name))
        out["base"] = ServedModel("base", "base", "hidden", "base", label=method_label("base"))
        return out

    def _searched(self) -> dict[str, dict[str, Any]]:
        """search key -> {mode, anchor, weights, aggregate, scores} of RUN/search/<key>/best.json, for the searches
        that match these adapters (checked as ``emorl evaluate`` does)."""
        from emorl.methods import resolve_methods

        out = {}
        for name, m in self.methods.items():
            if m.kind != "mix":
                continue
            try:
                spec = resolve_methods(self.run, self.cfg, [name])[0]
            except EmorlError as e:
                log.info("searched weights of %s not available: %s", name, e)
                continue
            best = spec.search or {}
            out[str(spec.search_key)] = {"method": name, "mode": spec.mode, "anchor": spec.anchor,
                                         "weights": dict(zip(self.objectives, spec.weights or [], strict=False)),
                                         "aggregate": best.get("aggregate"), "scores": best.get("scores")}
        return out

    def front_data(self) -> dict[str, Any]:
        """The search's points per mode (weights and per-objective scores), and RUN/front/front.json if present."""
        from emorl.utils import read_jsonl

        points: dict[str, list[dict[str, Any]]] = {}
        for f in sorted((self.run / "search").glob("*/points.jsonl")):
            mode = f.parent.name
            rows = [r for r in read_jsonl(f) if r.get("kind") != "header" and r.get("scores") and any(r["weights"])]
            points[mode] = [{"weights": dict(zip(self.objectives, r["weights"], strict=False)),
                             "scores": r["scores"], "aggregate": r.get("aggregate")} for r in rows]
        front = None
        f = self.run / "front" / "front.json"
        if f.exists():
            try:
                front = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                log.warning("%s is not valid JSON (%s); the page shows the search points only", f, e)
        return {"points": points, "front": front}

    # ------------------------------------------------------------------------------------------- scheduling

    def start(self) -> None:
        if self._thread is None:
            if self.scheduler == "step":
                from emorl.serve.scheduler import StepScheduler

                self._step = StepScheduler(self)
                target = self._step.run
            else:
                from emorl.serve.window import WindowScheduler

                self._window = WindowScheduler(self)
                target = self._window.run
            log.info("scheduler %s; KV budget %.0f MiB; prompts up to %d tokens, replies up to %d (default %d)",
                     self.scheduler, self.kv_budget / 2**20, self.prompt_limit, self.max_tokens,
                     self.default_max_tokens)
            self._thread = threading.Thread(target=target, name="emorl-serve-scheduler", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises :class:`Overloaded` when the queue is full, :class:`TooLarge` when its worst case
        cannot fit the KV budget even alone (step scheduler)."""
        step = getattr(self, "_step", None)
        if step is not None and not step.fits_alone(job):
            need = step.job_bytes(job)
            raise TooLarge(f"this request may need {need / 2**20:.1f} MiB of KV cache (prompt + max_tokens + the "
                           f"running cache's growth room, for {step.job_rows(job)} rows), over the server's budget "
                           f"of {self.kv_budget / 2**20:.1f} MiB (--kv-budget-mb; "
                           f"{step.reserve / 2**20:.1f} MiB of it kept for the prompt-prefix cache and a prefill's "
                           "work); lower max_tokens or n")
        with self._cond:
            if self._stopping:
                raise EmorlError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the server is full: {len(self._queue)} requests wait (--max-queue "
                                 f"{self.max_queue}); retry later", retry_after=1)
            self._queue.append(job)
            self._cond.notify_all()

    def score_async(self, statements: list[str], replies: list[str]) -> Any:
        """Future of {objective: [score per pair]}, computed on the side worker (off the decode path)."""
        return self.worker.score(statements, replies)

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it waits (at once), or end its rows at the next decoding step."""
        job.cancelled.set()
        with self._cond:
            self._cond.notify_all()

    def cancel_all(self) -> None:
        """Refuse new jobs, answer waiting ones with an error and end in-flight ones at the next step."""
        with self._cond:
            self._stopping = True
            self._cancel_inflight = True
            waiting, self._queue = self._queue, []
            self._cond.notify_all()
        for job in waiting:
            job.emit(("error", "the server is shutting down", None))

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def close(self, timeout: float = 30.0) -> None:
        """Stop: waiting jobs get an error, in-flight ones are cancelled (they end at the next step)."""
        self.cancel_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.worker.close()

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._queue if j.cancelled.is_set()]
        if gone:
            self._queue = [j for j in self._queue if not j.cancelled.is_set()]
            self.stats["dropped_before_start"] += len(gone)
            self.stats["cancelled"] += len(gone)
            for j in gone:
                j.emit(("done", None, None))

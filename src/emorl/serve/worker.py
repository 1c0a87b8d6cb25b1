"""The side worker of ``emorl serve``: ``/v1/score`` and the router (``"weights": "auto"``) off the decode path.

One thread owns everything it uses — its own copy of the base model for the rewards that read it (``fluency``
scores with the base, adapters off; sharing the decode thread's model would race with the LoRA bank), the rewards,
and the router with its sentence encoder — so no model or tokenizer is touched by two threads. Everything is
loaded once, at first use, on that thread, under a lock; callers get futures (the event loop awaits them, never blocks).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from emorl.utils import EmorlError


class Worker:
    """Scoring and routing for an engine's run, on one thread of its own."""

    def __init__(self, run: Any, cfg: Any, objectives: list[str], device: str) -> None:
        self.run, self.cfg, self.objectives, self.device = run, cfg, objectives, device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emorl-serve-worker")
        self._lock = threading.Lock()
        self._rewards: dict[str, Any] | None = None
        self._router: Any = None
        self.base: Any = None  # the worker's own base model (loaded with the rewards)

    def _load_rewards(self) -> dict[str, Any]:
        with self._lock:
            if self._rewards is None:
                from emorl.models import load_base
                from emorl.rewards import build_rewards

                self.base = load_base(self.cfg.model)
                self._rewards = build_rewards({o: self.cfg.objectives[o] for o in self.objectives}, self.base)
            return self._rewards

    def _load_router(self) -> Any:
        with self._lock:
            if self._router is None:
                from emorl.router.store import load_router, router_dir, run_adapters

                self._router = load_router(router_dir(self.run), run_adapters(self.run, self.objectives))[0]
            return self._router

    def forget_router(self) -> None:
        """Load the router again at its next use (after ``emorl route`` refitted it)."""
        with self._lock:
            self._router = None

    # ------------------------------------------------------------------------------------------- jobs

    def _score(self, statements: list[str], replies: list[str]) -> dict[str, list[float]]:
        from emorl.rewards import score

        return {name: score(rw, statements, replies).tolist() for name, rw in self._load_rewards().items()}

    def _route(self, statement: str) -> list[float]:
        from emorl.router.store import embed

        router = self._load_router()
        w, _ = router.predict(embed([statement], self.device))
        return [float(x) for x in w[0]]

    def score(self, statements: list[str], replies: list[str]) -> Future:
        """Future of {objective: [score per pair]}."""
        return self._pool.submit(self._score, statements, replies)

    def route(self, statement: str) -> Future:
        """Future of the router's weights for one statement (raises EmorlError when the run has no router)."""
        return self._pool.submit(self._route, statement)

    def close(self) -> None:
        """Refuse new work and drop queued work; a job in progress finishes on its own (shutdown does not wait)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def route_error(e: EmorlError) -> Exception:
    from emorl.serve.protocol import ApiError

    return ApiError(400, f"emorl.weights: \"auto\" needs the run's router ({e})", "emorl.weights",
                    "router_unavailable")

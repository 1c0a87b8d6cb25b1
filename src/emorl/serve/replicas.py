"""``emorl serve --replicas N``: N engines behind Ray Serve's HTTP proxy, with the API of one ``emorl serve``.

Each replica is a Ray actor that loads the run once (its own :class:`~emorl.serve.engine.Engine`: base, adapters,
rewards, scheduler thread) and serves the very app ``emorl serve`` serves (:func:`~emorl.serve.app.create_app`):
the OpenAI routes, streamed server-sent events, ``/v1/score`` and the page. Ray Serve's proxy sends each request to
the replica with the fewer requests in flight (it samples two), so per-step batching keeps working inside each
replica. Every response names the replica that served it in the ``X-Emorl-Replica`` header.

>>> ray.init()
>>> start(replica_app("runs/default", 2, engine_kwargs={"device": "cuda"}, num_gpus=1), "127.0.0.1", 8000)
>>> stop(); ray.shutdown()

A reply is a function of the request alone (its seed, weights and settings), not of the replica: every replica
loads the same run, so the reply equals what one ``emorl serve`` (and ``emorl generate``) gives for it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from emorl.utils import EmorlError

log = logging.getLogger("emorl.serve")

APP_NAME = "emorl"
REPLICA_HEADER = "x-emorl-replica"
# passed on to the replicas' processes (a local Ray's workers inherit them anyway; a cluster's do not)
ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "EMORL_CACHE",
            "OMP_WAIT_POLICY")


def import_serve() -> Any:
    """Ray Serve, or an error that names the install command (it is an optional extra)."""
    try:
        from ray import serve
    except ModuleNotFoundError as e:
        raise EmorlError(f"emorl serve --replicas needs Ray Serve ({e.name} is missing): "
                         "pip install 'emorl[ray]' (which installs ray[serve])") from e
    return serve


class ReplicaHeader:
    """ASGI middleware: every HTTP response (streamed or not) carries the replica's id, so a client (and the
    tests) can tell which engine answered. Pure ASGI, so a streamed body passes through chunk by chunk."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_named)


class EngineReplica:
    """One replica: loads the run when Ray starts the actor; Ray Serve builds its ASGI app with
    ``__serve_build_asgi_app__`` and runs the app's lifespan, which starts the engine's scheduler (and closes it
    when the replica stops)."""

    def __init__(self, run: str, engine_kwargs: dict[str, Any], app_kwargs: dict[str, Any], threads: int) -> None:
        import torch

        from emorl.serve.engine import Engine

        if threads > 0:  # the replica's share of the node's cores (Ray's num_cpus), not all of them
            torch.set_num_threads(threads)
        self.replica = import_serve().get_replica_context().replica_id.unique_id
        self.engine = Engine(run, **engine_kwargs)
        self.app_kwargs = app_kwargs
        log.info("replica %s: %s loaded", self.replica, run)

    def __serve_build_asgi_app__(self) -> Any:  # noqa: PLW3201 - Ray Serve's hook for an app built on the replica
        from emorl.serve.app import create_app

        app = create_app(self.engine, **self.app_kwargs)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


@functools.cache
def _ingress_class() -> type:
    """:class:`EngineReplica` as a Ray Serve ingress (built on first use: Ray is an optional extra)."""
    return import_serve().ingress()(EngineReplica)


def replica_app(run: str | Path, replicas: int, *, engine_kwargs: dict[str, Any] | None = None,
                app_kwargs: dict[str, Any] | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                max_ongoing_requests: int = 256, grace_s: float = 5.0) -> Any:
    """The Ray Serve application: ``replicas`` copies of the run's engine, each with ``num_cpus`` CPUs (its torch
    threads) and ``num_gpus`` GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``, so ``device: auto`` or ``cuda`` picks it).
    ``max_ongoing_requests`` is how many requests the proxy hands one replica at once: high, because the engine
    batches them per step and answers 429 itself when its queue is full."""
    serve = import_serve()
    run = Path(run).resolve()
    if not (run / "config.yaml").exists():
        raise EmorlError(f"--run {run}: no config.yaml there (is it a run folder made by `emorl train`?)")
    if replicas < 1 or num_cpus < 0 or num_gpus < 0 or max_ongoing_requests < 1:
        raise EmorlError("--replicas and the requests in flight per replica must be >= 1; CPUs and GPUs per replica "
                         ">= 0")
    deployment = serve.deployment(
        _ingress_class(), name="EmorlEngine", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, graceful_shutdown_timeout_s=grace_s + 5)
    return deployment.bind(str(run), dict(engine_kwargs or {}), dict(app_kwargs or {}), max(1, int(num_cpus)))


def start(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start Ray Serve's HTTP proxy on ``host:port`` (loopback by default) and deploy ``app`` at ``/``; returns
    once every replica has loaded the run and answers."""
    serve = import_serve()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def stop() -> None:
    """Delete the application and shut Ray Serve down (its proxy and controller); replicas drain first."""
    serve = import_serve()
    serve.shutdown()


def serve_replicas(run: str | Path, replicas: int, *, engine_kwargs: dict[str, Any], app_kwargs: dict[str, Any],
                   host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None, num_cpus: float = 1.0,
                   num_gpus: float = 0.0, grace_s: float = 5.0) -> int:
    """``emorl serve --replicas N``: join ``ray_address`` (or start a local Ray instance), serve until Ctrl-C or
    SIGTERM, then shut Ray Serve down (and the Ray instance this call started)."""
    app = replica_app(run, replicas, engine_kwargs=engine_kwargs, app_kwargs=app_kwargs, num_cpus=num_cpus,
                      num_gpus=num_gpus, grace_s=grace_s)
    import ray

    started = not ray.is_initialized()
    if started:
        env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
        ray.init(address=ray_address, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
    stopping = threading.Event()
    old = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(app, host, port)
        shown = f"[{host}]" if ":" in host else host
        print(f"emorl serve: {run} on {replicas} replicas at http://{shown}:{port}/ (Ray Serve; API: "
              f"http://{shown}:{port}/v1{', API key required' if app_kwargs.get('api_key') else ''}); Ctrl-C stops",
              flush=True)
        while not stopping.wait(1.0):
            pass
        log.info("shutting down: replicas drain their in-flight requests (at most %.0f s)", grace_s + 5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        stop()
        if started:
            ray.shutdown()
    return 0

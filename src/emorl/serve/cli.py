"""``emorl serve``: serve a run over HTTP (OpenAI-compatible API + a web page with one slider per objective).

    emorl serve --run runs/default                      # http://127.0.0.1:8000/
    EMORL_API_KEY=secret emorl serve --run runs/default --host 0.0.0.0 --port 8080

Concurrent requests with different weights share one batch. --scheduler step (default): every decode step admits
waiting requests (prefilled in chunks of --prefill-chunk positions, while their worst case fits --kv-budget-mb) and
retires finished ones. --scheduler window (the first design): a batch forms while requests keep arriving (gaps
under --max-gap-ms, at most --max-wait-ms after the oldest) and decodes to its longest reply's end.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
from typing import Any

from emorl.utils import EmorlError

log = logging.getLogger("emorl.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a run: OpenAI-compatible API and a web page to steer the objectives",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (config.yaml, adapters/, search/, baselines/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: env EMORL_API_KEY; none = open)")
    p.add_argument("--max-batch-rows", type=int, default=96,
                   help="most backbone rows (requests x choices x adapters used) decoded in one batch")
    p.add_argument("--max-wait-ms", type=float, default=100.0,
                   help="the longest the oldest waiting request waits for others to share its batch (counted from its "
                        "arrival, or from the end of the batch it waited through)")
    p.add_argument("--max-gap-ms", type=float, default=10.0,
                   help="a batch starts once no request has arrived for this long (a lone request waits this much)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int,
                   help="max_tokens of a request that names none (default: 384, where >= 95%% of the default run's "
                        "replies ended with EOS; docs/serve.md)")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="lower the prompt limit (default: the model's context minus the request's max_tokens)")
    p.add_argument("--scheduler", choices=("step", "window"), default="step",
                   help="step: admit and retire requests at every decode step (default); window: the first design")
    p.add_argument("--kv-budget-mb", type=float,
                   help="KV-cache byte budget (it also keeps a 16th for the prompt-prefix cache and at most a 16th "
                        "for one prefill's work); a request is admitted when its worst case fits (default: a quarter "
                        "of the free memory, printed at start)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="most waiting requests; more are answered 429 with Retry-After")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="most prompt tokens x rows one prefill forward computes (vLLM's max_num_batched_tokens): "
                        "waiting requests beyond it are prefilled at a later step, and a lone request over it in "
                        "shorter chunks. Bounds the forward's work memory beside the KV budget (about 50 KiB per "
                        "token-row for SmolLM2-135M in float32) and how long one prefill stalls the running replies")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt positions prefilled per step (decode steps of running replies go in between)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole (by default the system prompt's keys and values are computed once "
                        "per stream and reused; the cache takes a 16th of --kv-budget-mb, at most 128 MiB)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body, in KiB")
    p.add_argument("--grace-s", type=float, default=5.0,
                   help="after Ctrl-C / SIGTERM, how long in-flight requests may finish before they are cancelled")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run config's)")
    r = p.add_argument_group("replicas (Ray Serve; pip install 'emorl[ray]'; docs/scale.md)")
    r.add_argument("--replicas", type=int, default=0,
                   help="run N engine replicas behind Ray Serve's HTTP proxy, same API (default: one engine, no Ray)")
    r.add_argument("--ray-address", help="--replicas: Ray cluster to join (auto, HOST:PORT); default: a local one")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="--replicas: CPUs per replica (its torch threads)")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="--replicas: GPUs per replica (0.5: two per GPU)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from emorl.serve.app import create_app
    except ModuleNotFoundError as e:
        raise EmorlError(f"emorl serve needs the serve extra ({e.name} is missing): pip install 'emorl[serve]'") from e
    from emorl.serve.engine import Engine

    key = args.api_key or os.environ.get("EMORL_API_KEY") or None
    if not is_loopback(args.host) and not key:
        log.warning("binding %s without an API key: anyone who can reach this port can use the model. Set "
                    "--api-key (or EMORL_API_KEY) and put a TLS reverse proxy in front", args.host)
    engine_kwargs = dict(max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms, max_gap_ms=args.max_gap_ms,
                         max_tokens=args.max_tokens, device=args.device, scheduler=args.scheduler,
                         kv_budget_mb=args.kv_budget_mb, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                         max_prefill_tokens=args.max_prefill_tokens, prefix_cache=not args.no_prefix_cache,
                         max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens)
    app_kwargs = dict(api_key=key, max_body_bytes=args.max_body_kb * 1024)
    if args.replicas:
        from emorl.serve.replicas import serve_replicas

        return serve_replicas(args.run, args.replicas, engine_kwargs=engine_kwargs, app_kwargs=app_kwargs,
                              host=args.host, port=args.port, ray_address=args.ray_address,
                              num_cpus=args.replica_cpus, num_gpus=args.replica_gpus, grace_s=args.grace_s)
    engine = Engine(args.run, **engine_kwargs)
    app = create_app(engine, **app_kwargs)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"emorl serve: {args.run} ({', '.join(engine.objectives)}) at http://{host}:{args.port}/ "
          f"(API: http://{host}:{args.port}/v1{', API key required' if key else ''}); Ctrl-C stops", flush=True)
    print(f"emorl serve: scheduler {engine.scheduler}, KV budget {engine.kv_budget / 2**20:.0f} MiB, prompts up to "
          f"{engine.prompt_limit} tokens, replies up to {engine.max_tokens} (default {engine.default_max_tokens})",
          flush=True)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                    timeout_graceful_shutdown=args.grace_s + 5), engine, args.grace_s)
    server.run()
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose first Ctrl-C / SIGTERM drains: new connections are refused, in-flight requests
        get ``grace`` seconds to finish, then the scheduler cancels them at the next step (each stream ends with its
        finish chunk and [DONE]) — so uvicorn never has to kill a task. The signal is handled, not re-raised:
        a requested shutdown exits with status 0."""

        def __init__(self, config: Any, engine: Any, grace: float) -> None:
            super().__init__(config)
            self.engine, self.grace = engine, grace

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if first:
                log.info("shutting down: in-flight requests have %.0f s to finish", self.grace)
                timer = threading.Timer(self.grace, self.engine.cancel_all)
                timer.daemon = True
                timer.start()

    return Server


def _Server(config: Any, engine: Any, grace: float) -> Any:  # noqa: N802 - built lazily (uvicorn is optional)
    return _server_class()(config, engine, grace)

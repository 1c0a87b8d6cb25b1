"""``emorl serve``: serve a run over HTTP (OpenAI-compatible API + a web page with one slider per objective).

    emorl serve --run runs/default                      # http://127.0.0.1:8000/
    EMORL_API_KEY=secret emorl serve --run runs/default --host 0.0.0.0 --port 8080

Concurrent requests with different weights are decoded in one batch: the scheduler waits at most --max-wait-ms
after the oldest waiting request for others, up to --max-batch-rows backbone rows (requests x adapters).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

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
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the oldest waiting request waits for others to share its batch")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body, in KiB")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the run config's)")
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
    engine = Engine(args.run, max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms,
                    max_tokens=args.max_tokens, device=args.device)
    app = create_app(engine, api_key=key, max_body_bytes=args.max_body_kb * 1024)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"emorl serve: {args.run} ({', '.join(engine.objectives)}) at http://{host}:{args.port}/ "
          f"(API: http://{host}:{args.port}/v1{', API key required' if key else ''}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    return 0

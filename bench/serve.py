"""Load test of ``emorl serve`` on loopback: concurrent clients, each with its own weights, vs one at a time.

    python bench/serve.py --run runs/default                         # 1, 4, 16 clients, 48 new tokens
    python bench/serve.py --run runs/default --clients 1,4,16,64     # on a GPU
    python bench/serve.py --run runs/tiny --requests 16 --screenshot docs/figures/serve.png
    python bench/serve.py --quick             # 1 and 2 clients, 4 requests x 8 tokens, on a tiny run in a temp folder

For each client count c, a fixed set of R requests (request j: statement j mod 8, client j mod c's weight vector,
seed j, sampled at the run's temperature, ``max_tokens`` new tokens, weight rule ``--anchor``) is sent twice
through the SAME in-process server: by c concurrent clients (closed loop: each sends its next request when its
reply arrives), and one at a time. Reported: requests/s, completion tokens/s, p50/p95 latency of both, the
speed-up, p95 over a lone request's latency (the one-at-a-time p50), and whether every reply is identical between
the two (same seed, same reply, whatever shared its batch). Bounded: 2 x R requests per client count, then stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import bench_parser, run_folder  # noqa: E402
from serve_load import STATEMENTS, InProcess  # noqa: E402


def requests_for(n: int, clients: int, weights: np.ndarray, objectives: list[str], max_tokens: int,
                 temperature: float, anchor: str) -> list[dict[str, Any]]:
    return [{"model": "emorl", "messages": [{"role": "user", "content": STATEMENTS[j % len(STATEMENTS)]}],
             "max_tokens": max_tokens, "temperature": temperature, "seed": j,
             "emorl": {"weights": dict(zip(objectives, map(float, weights[j % clients]), strict=True)),
                       "anchor": anchor}}
            for j in range(n)]


def send_all(url: str, reqs: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Closed loop: ``clients`` workers, worker i sends requests i, i + clients, ... one after another; all start
    together (a barrier after each made its HTTP client: making one takes tens of ms, which staggered the start)."""
    import httpx

    replies: list[str | None] = [None] * len(reqs)  # None: no reply came back
    tokens = [0] * len(reqs)
    lat = [0.0] * len(reqs)

    ready = threading.Barrier(clients)

    def worker(i: int) -> None:
        with httpx.Client(timeout=600) as client:  # made before the start: a load tester's clients are ready
            ready.wait()
            for j in range(i, len(reqs), clients):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/chat/completions", json=reqs[j])
                lat[j] = time.perf_counter() - t0
                r.raise_for_status()
                out = r.json()
                replies[j] = out["choices"][0]["message"]["content"]
                tokens[j] = out["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests_per_s": len(reqs) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "tokens": sum(tokens), "answered": sum(r is not None for r in replies), "replies": replies}


def screenshot(url: str, path: str) -> None:
    """The page after one generated reply, in headless Chromium (selenium + the system's chromium-driver)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = Options()
    opts.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,820", "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(url + "/")
        wait = WebDriverWait(d, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sliders input"))
        d.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text in ("done",) or "error" in
                   d.find_element(By.ID, "status").text)
        time.sleep(0.5)  # the bars' transition
        d.save_screenshot(path)
    finally:
        d.quit()


def main() -> int:
    ap = bench_parser(__doc__, "1 and 2 clients, 4 requests of 8 new tokens each")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per client count (each sent twice)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, help="default: the run's eval.generation temperature")
    ap.add_argument("--anchor", choices=["base", "none"], default="base",
                    help="weight rule of every request (base: the base stream joins the batch, weights used as "
                         "given; none: convex)")
    ap.add_argument("--scheduler", choices=["step", "window"], default="step", help="emorl serve --scheduler")
    ap.add_argument("--max-wait-ms", type=float, default=100.0)
    ap.add_argument("--max-gap-ms", type=float, default=10.0)
    ap.add_argument("--max-batch-rows", type=int, default=256)
    ap.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the page")
    ap.add_argument("--no-prefix-cache", action="store_true", help="the server without its prompt-prefix cache")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = "1,2", 4, 8
    import torch

    torch.set_num_threads(int(os.environ.get("EMORL_THREADS", str(torch.get_num_threads()))))
    with run_folder(args, ap) as run:
        rows = measure(args, str(run))
    print("\n| clients | req/s | tok/s | p50 s | p95 s | one-at-a-time req/s | speed-up | p95 / lone | same replies |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, a = r["concurrent"], r["one_at_a_time"]
        print(f"| {r['clients']} | {t['requests_per_s']:.2f} | {t['tokens_per_s']:.0f} | {t['p50_s']:.2f} | "
              f"{t['p95_s']:.2f} | {a['requests_per_s']:.2f} | {r['speedup']:.2f}x | {r['p95_over_lone']:.2f} | "
              f"{'yes' if r['identical_replies'] else 'NO'} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"run": str(run), "levels": rows, "torch_threads":
                                                 torch.get_num_threads()}, indent=2))
    return 0 if all(r["identical_replies"] for r in rows) else 1


def measure(args: argparse.Namespace, run: str) -> list[dict[str, Any]]:
    """Each client count's requests, concurrent then one at a time, through one in-process server."""
    srv = InProcess(run, args.scheduler, None, max(args.max_tokens, 64), args.max_batch_rows,
                    max_wait_ms=args.max_wait_ms, max_gap_ms=args.max_gap_ms, prefix_cache=not args.no_prefix_cache)
    engine, url = srv.engine, srv.url
    objectives = engine.objectives
    temperature = args.temperature if args.temperature is not None else engine.cfg.eval.generation.temperature
    levels = [int(c) for c in args.clients.split(",")]
    # each client its own weights in [0.1, 1]^K (base-anchored: off the simplex, so every request has the base stream)
    weights = np.random.default_rng(0).uniform(0.1, 1.0, size=(max(levels), len(objectives))).round(3)
    rows = []

    def idle() -> None:
        for _ in range(500):  # bounded: 10 s
            if engine.pending() == 0:
                return
            time.sleep(0.02)

    try:
        # warm-up: every statement once, so that neither part times a cache's first fill (emorl.serve.prefix: the
        # prompt-prefix cache's entries for these prompts' streams are made here, as after a while of traffic)
        send_all(url, requests_for(len(STATEMENTS), 1, weights, objectives, 1, temperature, args.anchor), 1)
        for c in levels:
            reqs = requests_for(args.requests, c, weights, objectives, args.max_tokens, temperature, args.anchor)
            idle()
            b0, s0 = engine.stats["batches"], engine.stats.get("steps", 0)
            together = send_all(url, reqs, c)
            idle()  # replies go out before the batch's stats are updated
            batches, last = engine.stats["batches"] - b0, dict(engine.stats["last_batch"] or {})
            steps = engine.stats.get("steps", 0) - s0
            alone = send_all(url, reqs, 1)
            same = together["replies"] == alone["replies"]
            rows.append({"clients": c, "requests": len(reqs), "max_tokens": args.max_tokens,
                         "concurrent": {k: v for k, v in together.items() if k != "replies"},
                         "one_at_a_time": {k: v for k, v in alone.items() if k != "replies"},
                         "speedup": together["requests_per_s"] / alone["requests_per_s"],
                         "p95_over_lone": together["p95_s"] / alone["p50_s"], "identical_replies": same,
                         "batches": batches, "last_batch": last, "steps": steps,
                         "max_running_jobs": engine.stats.get("max_running_jobs")})
            print(f"clients={c}: {together['requests_per_s']:.2f} req/s ({together['tokens_per_s']:.0f} tok/s) vs "
                  f"{alone['requests_per_s']:.2f} one at a time -> x{rows[-1]['speedup']:.2f}; p50 "
                  f"{together['p50_s']:.2f} s p95 {together['p95_s']:.2f} s (lone {alone['p50_s']:.2f} s); "
                  f"identical replies: {same}; {batches} batches (window), {steps} steps (step)", flush=True)
        if args.screenshot:
            screenshot(url, args.screenshot)
    finally:
        srv.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""Open-loop load test of ``emorl serve`` in the field's terms (modelled on ``vllm bench serve``), both schedulers
side by side in one run on one machine, loopback only.

    python bench/serve_load.py --run runs/default                                # rates 0.25, 0.5 req/s
    python bench/serve_load.py --run runs/default --rates 0.5,1,2 --requests 64 --burstiness 0.5
    python bench/serve_load.py --run runs/default --rates 4,8 --clients 64       # a GPU (bench/gpu.sh)
    python bench/serve_load.py --quick        # every part, a few short requests, on a tiny run in a temp folder

For each scheduler (``--schedulers step,window``: the same model, one server at a time: in this process, or with
``--own-process`` as ``emorl serve`` in its own, where the client's threads share no interpreter lock with it) and
each rate, ``--requests`` requests arrive open-loop (gamma inter-arrival times with shape ``--burstiness``; 1 =
Poisson), each with its own weight vector (Dirichlet over the objectives, base-anchored hidden mix of model
``emorl``), its own seed, sampled at the run's temperature, and a mixed length: 70% draw ``max_tokens`` from 24-64,
30% from 128-256 (``--long-share``). ``--clients`` caps the requests in flight (vLLM's ``--max-concurrency``). Each
rate stops sending after ``--max-seconds`` and cancels what is still running ``--drain-seconds`` later: bounded in
count and time. Reported per rate: TTFT, TPOT (time per output token after the first), end-to-end latency
(p50/p95/p99), request and output-token throughput, and goodput (requests/s meeting TTFT <= ``--slo-ttft`` and TPOT
<= ``--slo-tpot``, DistServe's definition; several TPOT SLOs give goodput under each). Then the head-of-line
scenario: one 256-token request, and 0.5 s later four 8-token requests, then again after each burst ends (8 bursts
at random phases of the long request's decode step, while it runs); their time to first token against a lone 8-token
request's, and against the same four sent together with nothing running (what their own prefill costs: on a
compute-bound CPU, four prompts cost about four; bench/prefill_cost.py measures it).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _common import bench_parser, run_folder  # noqa: E402

STATEMENTS = ["I lost my job today and I don't know how to tell my family.", "My cat is sick and the vet is expensive.",
              "Nobody calls me anymore and the evenings are long.", "I failed the exam again.",
              "My sister and I had a huge fight.", "I can't sleep before my presentation.",
              "I feel like nothing I do at work matters.", "I moved to a new city and I know no one."]


class InProcess:
    """One engine + uvicorn on a free loopback port, stopped by :meth:`stop`."""

    def __init__(self, run: str, scheduler: str, base: Any, max_tokens: int, max_batch_rows: int,
                 **engine_kw: Any) -> None:
        import uvicorn

        from emorl.serve import Engine, create_app

        self.engine = Engine(run, scheduler=scheduler, base=base, max_tokens=max_tokens,
                             max_batch_rows=max_batch_rows, **{"max_queue": 4096, **engine_kw})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        self.objectives = self.engine.objectives

    @property
    def stats(self) -> dict[str, Any]:
        return self.engine.stats

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.engine.close()


class OwnProcess:
    """``emorl serve`` in its own process on a free loopback port (``--own-process``, and the flood's memory):
    the client's threads then share no interpreter lock with the server, as with a client on another machine.
    :meth:`stop` ends it."""

    engine = None  # no in-process engine: the parts that need one (agreement, the in-process flood) do not run

    def __init__(self, run: str, options: list[str]) -> None:
        import os
        import subprocess

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "emorl.cli", "serve", "--run", run, "--port", str(port), *options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            for _ in range(1200):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"emorl serve exited with {self.proc.returncode}: {' '.join(cmd)}")
                try:
                    if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.25)
            self.objectives = httpx.get(f"{self.url}/v1/objectives", timeout=30).json()["objectives"]
        except BaseException:
            self.stop()
            raise

    @property
    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=30).json()["stats"]

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_request(url: str, req: dict[str, Any], stop_at: float) -> dict[str, Any]:
    """Stream one request; times from its send: first content token, end; tokens from the usage chunk."""
    import httpx

    t0 = time.perf_counter()
    first, tokens, finish, error = None, 0, None, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=req, timeout=None) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"{r.status_code}: {r.text[:200]}", "e2e": time.perf_counter() - t0}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                for c in ev.get("choices") or []:
                    if first is None and c.get("delta", {}).get("content"):
                        first = time.perf_counter() - t0
                    finish = c.get("finish_reason") or finish
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if time.perf_counter() > stop_at:
                    error = "cancelled at the time bound"
                    break
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    e2e = time.perf_counter() - t0
    return {"ttft": first, "e2e": e2e, "tokens": tokens, "finish": finish, "error": error,
            "tpot": (e2e - first) / (tokens - 1) if first is not None and tokens > 1 else None}


def workload(n: int, objectives: list[str], seed: int, long_share: float, temperature: float,
             short: tuple[int, int] = (24, 64), long: tuple[int, int] = (128, 256)) -> list[dict]:
    """``n`` streamed requests, each its own Dirichlet weights and seed; ``max_tokens`` drawn from ``long`` (both
    ends included) with probability ``long_share``, else from ``short``."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        w = rng.dirichlet(np.ones(len(objectives)))
        lo, hi = long if rng.random() < long_share else short
        max_tokens = int(rng.integers(lo, hi + 1))
        out.append({"model": "emorl", "messages": [{"role": "user", "content": STATEMENTS[j % len(STATEMENTS)]}],
                    "max_tokens": max_tokens, "temperature": temperature, "seed": j, "stream": True,
                    "stream_options": {"include_usage": True},
                    "emorl": {"weights": dict(zip(objectives, map(float, w), strict=True)), "anchor": "base"}})
    return out


def open_loop(url: str, reqs: list[dict], rate: float, burstiness: float, clients: int, seed: int,
              max_seconds: float, drain_seconds: float) -> dict[str, Any]:
    """Send ``reqs`` at gamma-distributed arrival times (mean 1/rate), at most ``clients`` in flight."""
    rng = np.random.default_rng(seed + 1)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=len(reqs))
    results: list[dict[str, Any]] = []
    slots = threading.Semaphore(clients)
    lock = threading.Lock()
    t_start = time.perf_counter()
    stop_at = t_start + max_seconds + drain_seconds
    threads = []

    def go(req: dict[str, Any]) -> None:
        try:
            res = one_request(url, req, stop_at)
        finally:
            slots.release()
        with lock:
            results.append({**res, "max_tokens": req["max_tokens"]})

    t_next = t_start
    for req, gap in zip(reqs, gaps, strict=True):
        t_next += gap
        if t_next - t_start > max_seconds:
            break
        time.sleep(max(0.0, t_next - time.perf_counter()))
        slots.acquire()
        threads.append(threading.Thread(target=go, args=(req,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(max(0.0, stop_at - time.perf_counter()) + 30)
    return {"sent": len(threads), "seconds": time.perf_counter() - t_start, "results": results}


def summarise(run: dict[str, Any], slo_ttft: float, slo_tpots: list[float]) -> dict[str, Any]:
    """Percentiles, throughput, and goodput under each TPOT SLO (the first is ``goodput``); the requests' own
    times are kept (``requests``) so that another SLO can be applied afterwards."""
    ok = [r for r in run["results"] if r.get("error") is None and r.get("ttft") is not None]

    def pct(key: str) -> dict[str, float | None]:
        vals = [r[key] for r in ok if r.get(key) is not None]
        if not vals:
            return {"p50": None, "p95": None, "p99": None}
        return {f"p{q}": round(float(np.percentile(vals, q)), 3) for q in (50, 95, 99)}

    def good(slo_tpot: float) -> int:
        return sum(r["ttft"] <= slo_ttft and (r["tpot"] is None or r["tpot"] <= slo_tpot) for r in ok)

    secs = run["seconds"]
    return {"sent": run["sent"], "completed": len(ok), "failed": len(run["results"]) - len(ok),
            "seconds": round(secs, 1), "ttft": pct("ttft"), "tpot": pct("tpot"), "e2e": pct("e2e"),
            "req_per_s": round(len(ok) / secs, 3), "tok_per_s": round(sum(r["tokens"] for r in ok) / secs, 2),
            "goodput": round(good(slo_tpots[0]) / secs, 3),
            "goodput_by_tpot": {str(t): round(good(t) / secs, 3) for t in slo_tpots}, "eos_share": round(
                sum(r["finish"] == "stop" for r in ok) / max(1, len(ok)), 3),
            "requests": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in run["results"]]}


def head_of_line(url: str, objectives: list[str], temperature: float, long_tokens: int = 256, short_tokens: int = 8,
                 delay: float = 0.5, bursts: int = 8, seed: int = 0) -> dict[str, Any]:
    """After each probe prompt once (the server's caches warm, as after a while of traffic: a prompt-prefix cache's
    entries for these prompts' streams are made then), a lone short request's TTFT (the median of 3); the four short
    requests together with nothing running (their own prefill); then one long request and, ``delay`` s later, the
    four short ones (by default 8 and 256 tokens, 0.5 s), and again after each burst has finished, a random 0-0.4 s
    later, up to ``bursts`` bursts while the long request runs: a burst lands at a random point of the long request's
    decode step, and where it lands decides how long it waits. ``ratio``: the worst short TTFT of any burst behind
    the long one ÷ the lone TTFT (the issue's target, for every burst); ``ratios``: each burst's worst ÷ the lone;
    ``behind_long_vs_alone``: the worst ÷ the four's worst TTFT alone, the part the long request adds."""
    w = {o: 1.0 / len(objectives) for o in objectives}

    def req(max_tokens: int, seed: int) -> dict[str, Any]:
        return {"model": "emorl", "messages": [{"role": "user", "content": STATEMENTS[seed % 8]}],
                "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True}, "emorl": {"weights": w, "anchor": "base"}}

    far = time.perf_counter() + 3600
    for seed_ in range(6):  # warm: each probe prompt once, so no part times a cache's first fill (emorl.serve.prefix)
        one_request(url, req(1, seed_), far)
    lone = float(np.median([one_request(url, req(short_tokens, 1), far)["ttft"] for _ in range(3)]))

    def four_shorts() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        ts = [threading.Thread(target=lambda s=s: got.append(one_request(url, req(short_tokens, s), far)))
              for s in range(2, 6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return got

    # the four short requests alone (nothing running): what their own prefill costs together, against which the
    # long request's share of their wait is measured
    alone = max(s["ttft"] or float("inf") for s in four_shorts())
    out: dict[str, Any] = {}
    done = threading.Event()

    def long_request() -> None:
        out["long"] = one_request(url, req(long_tokens, 0), far)
        done.set()

    long_t = threading.Thread(target=long_request)
    long_t.start()
    time.sleep(delay)
    rng = np.random.default_rng(seed)
    worsts: list[float] = []
    for b in range(bursts):
        if b:
            time.sleep(float(rng.uniform(0.0, 0.4)))
            if done.is_set():
                break  # later bursts count only while the long request runs
        worsts.append(max(s["ttft"] or float("inf") for s in four_shorts()))
    long_t.join()
    worst = max(worsts)
    return {"lone_ttft": round(lone, 3), "short_ttft_max": round(worst, 3), "ratio": round(worst / lone, 2),
            "bursts": len(worsts), "ratios": [round(x / lone, 2) for x in worsts],
            "ratio_median": round(float(np.median(worsts)) / lone, 2), "four_alone_ttft_max": round(alone, 3),
            "ratio_four_alone": round(alone / lone, 2), "behind_long_vs_alone": round(worst / alone, 2),
            "long_e2e": round(out["long"]["e2e"], 2), "long_tokens": out["long"]["tokens"]}


def agreement(url: str, engine: Any, n: int, max_tokens: int) -> dict[str, Any]:
    """Greedy replies of ``n`` requests sent at once (each its own Dirichlet weights, base-anchored hidden mix)
    against ``EnsembleModel.generate`` of the same points (one call per statement, all its points together)."""
    import httpx

    objectives = engine.objectives
    rng = np.random.default_rng(7)
    reqs = [(j % len(STATEMENTS), [float(x) for x in rng.dirichlet(np.ones(len(objectives)))]) for j in range(n)]
    got: dict[int, str] = {}

    def send(j: int) -> None:
        s, w = reqs[j]
        r = httpx.post(f"{url}/v1/chat/completions", timeout=None, json={
            "model": "emorl", "messages": [{"role": "user", "content": STATEMENTS[s]}], "max_tokens": max_tokens,
            "temperature": 0, "emorl": {"weights": w, "anchor": "base"}})
        got[j] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=send, args=(j,)) for j in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served_s = time.perf_counter() - t0
    while engine.pending():
        time.sleep(0.05)
    same = 0
    for s in sorted({s for s, _ in reqs}):
        js = [j for j, (sj, _) in enumerate(reqs) if sj == s]
        ref = engine.ens.generate([STATEMENTS[s]], [reqs[j][1] for j in js], max_new_tokens=max_tokens)
        same += sum(got[j] == ref.all_texts[g][0] for g, j in enumerate(js))
    return {"requests": n, "max_tokens": max_tokens, "identical": same, "served_seconds": round(served_s, 1)}


def flood_codes(url: str, n: int, seconds: float, objectives: list[str],
                short: tuple[int, int] = (24, 64)) -> tuple[list[int], float]:
    """``n`` plain requests (``short``: 24-64 new tokens each) spread evenly over ``seconds``: each one's status."""
    import httpx

    reqs = workload(n, objectives, 5, 0.0, 1.0, short=short)
    codes: list[int] = []
    lock = threading.Lock()

    def send(req: dict[str, Any]) -> None:
        body = {**req, "stream": False}
        body.pop("stream_options")
        try:
            code = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900).status_code
        except httpx.HTTPError:
            code = -1
        with lock:
            codes.append(code)

    threads = []
    t0 = time.perf_counter()
    for j, req in enumerate(reqs):
        time.sleep(max(0.0, t0 + j * seconds / n - time.perf_counter()))
        threads.append(threading.Thread(target=send, args=(req,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(960)
    return codes, time.perf_counter() - t0


def flood(url: str, engine: Any, n: int, seconds: float, objectives: list[str],
          short: tuple[int, int] = (24, 64)) -> dict[str, Any]:
    """The flood against the in-process server: served, 429s and the KV reserved (the process's RSS also holds the
    client threads, so ``--flood-process`` measures the server's memory)."""
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    codes, secs = flood_codes(url, n, seconds, objectives, short)
    return {"requests": n, "over_s": seconds, "served": codes.count(200), "429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429), "max_queue": engine.max_queue,
            "kv_budget_mb": round(engine.kv_budget / 2**20, 1),
            "max_kv_reserved_mb": round(engine.stats["max_kv_bytes_reserved"] / 2**20, 1),
            "peak_rss_mb_before": round(rss0), "seconds": round(secs, 1),
            "peak_rss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _proc_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def flood_process(run: str, n: int, seconds: float, max_queue: int, kv_budget_mb: float,
                  short: tuple[int, int] = (24, 64), max_prefill_tokens: int | None = None,
                  extra: list[str] = ()) -> dict[str, Any]:
    """The flood against ``emorl serve`` in its own process (loopback, stopped at the end): its peak RSS (VmHWM)
    against its RSS once loaded plus the KV budget, the 429s, and the served."""
    import httpx

    options = ["--max-queue", str(max_queue), "--kv-budget-mb", str(kv_budget_mb)]
    if max_prefill_tokens:
        options += ["--max-prefill-tokens", str(max_prefill_tokens)]
    srv = OwnProcess(run, options + list(extra))  # more `emorl serve` options
    try:
        warm = {**workload(1, srv.objectives, 99, 0.0, 1.0)[0], "stream": False}
        warm.pop("stream_options")
        httpx.post(f"{srv.url}/v1/chat/completions", json=warm, timeout=600)  # loaded and warmed up
        loaded = _proc_mb(srv.proc.pid, "VmRSS")
        codes, secs = flood_codes(srv.url, n, seconds, srv.objectives, short)
        stats = srv.stats
        peak = _proc_mb(srv.proc.pid, "VmHWM")
    finally:
        srv.stop()
    return {"requests": n, "over_s": seconds, "served": codes.count(200), "429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429), "max_queue": max_queue,
            "kv_budget_mb": kv_budget_mb, "max_prefill_tokens": max_prefill_tokens or "default", "options": list(extra),
            "max_kv_reserved_mb": round(stats["max_kv_bytes_reserved"] / 2**20, 1),
            "server_rss_mb_loaded": round(loaded), "server_peak_rss_mb": round(peak),
            "peak_within_loaded_plus_budget": peak <= loaded + kv_budget_mb, "seconds": round(secs, 1)}


def main() -> int:
    ap = bench_parser(__doc__, "both schedulers, rates 8,16 of 3 requests of 4-16 tokens, a 16-token head-of-line "
                               "probe, 3 agreement requests, a 6-request flood into a queue of 1")
    ap.add_argument("--schedulers", default="step,window")
    ap.add_argument("--rates", default="0.25,0.5", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=16, help="requests per rate (at most)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    ap.add_argument("--clients", type=int, default=64, help="most requests in flight")
    ap.add_argument("--long-share", type=float, default=0.3)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop sending after this long (per rate)")
    ap.add_argument("--drain-seconds", type=float, default=60.0, help="then cancel what still runs after this long")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", default="0.25", help="TPOT SLO(s) in s, comma-separated: goodput under each "
                    "(the first is `goodput`)")
    ap.add_argument("--max-batch-rows", type=int, default=256)
    ap.add_argument("--no-head-of-line", action="store_true")
    ap.add_argument("--agreement", type=int, default=0,
                    help="also send this many greedy requests at once (step scheduler) and compare with generate")
    ap.add_argument("--flood", type=int, default=0, help="also send this many plain requests in --flood-seconds "
                    "(step scheduler, --max-queue, --kv-budget-mb) and count the served and the 429s")
    ap.add_argument("--flood-seconds", type=float, default=10.0)
    ap.add_argument("--flood-process", action="store_true", help="only the flood, against `emorl serve` in its own "
                    "process (its peak RSS against its loaded RSS + --kv-budget-mb, default 256)")
    ap.add_argument("--max-queue", type=int, default=4096)
    ap.add_argument("--kv-budget-mb", type=float)
    ap.add_argument("--max-prefill-tokens", type=int, help="--flood-process: the server's --max-prefill-tokens")
    ap.add_argument("--no-prefix-cache", action="store_true", help="the server without its prompt-prefix cache")
    ap.add_argument("--own-process", action="store_true",
                    help="each scheduler's server as `emorl serve` in its own process (as a client on another "
                         "machine sees it: the client's threads share no interpreter lock with the server); "
                         "without --agreement and --flood, which read the in-process engine")
    ap.add_argument("--device", help="cpu, cuda, ... (default: the run config's)")
    args = ap.parse_args()
    if args.own_process and (args.agreement or args.flood) and not args.flood_process:
        ap.error("--own-process runs no --agreement or in-process --flood (they read the engine); "
                 "run them without it, or the flood with --flood-process")
    sizes: dict[str, Any] = {}  # request lengths: the defaults of workload() and head_of_line()
    if args.quick:
        args.rates, args.requests, args.clients, args.long_share = "8,16", 3, 4, 0.5
        args.max_seconds, args.drain_seconds, args.agreement = 5.0, 20.0, 3
        args.flood, args.flood_seconds, args.max_queue = 6, 0.1, 1
        if args.own_process:  # the parts that read the in-process engine do not run
            args.agreement = args.flood = 0
        sizes = {"short": (4, 8), "long": (12, 16), "hol": {"long_tokens": 16, "short_tokens": 4, "delay": 0.05,
                                                                     "bursts": 1}}
    with run_folder(args, ap) as run:
        results = measure(args, str(run), sizes)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


def measure(args: argparse.Namespace, run: str, sizes: dict[str, Any]) -> dict[str, Any]:
    """Every part the arguments ask for, one scheduler's in-process server at a time (or only the own-process
    flood); ``sizes`` shrinks the requests (--quick)."""
    if args.flood_process:
        out = flood_process(run, args.flood or 500, args.flood_seconds, args.max_queue, args.kv_budget_mb or 256,
                            sizes.get("short", (24, 64)), args.max_prefill_tokens,
                            ["--no-prefix-cache"] if args.no_prefix_cache else [])
        print("flood (own process)", out, flush=True)
        return {"args": vars(args), "flood_process": out}

    from emorl.config import load_config
    from emorl.models import load_base

    cfg = load_config(Path(run) / "config.yaml")
    if args.device:
        cfg.model.device = args.device
    base = None if args.own_process else load_base(cfg.model)
    temperature = cfg.eval.generation.temperature
    lengths = {k: v for k, v in sizes.items() if k in ("short", "long")}
    results: dict[str, Any] = {"args": vars(args), "schedulers": {}}
    for sched in args.schedulers.split(","):
        srv: InProcess | OwnProcess
        if args.own_process:
            srv = OwnProcess(run, ["--scheduler", sched, "--max-tokens", "512", "--max-batch-rows",
                                   str(args.max_batch_rows), "--max-queue", "4096",
                                   *(["--no-prefix-cache"] if args.no_prefix_cache else []),
                                   *(["--device", args.device] if args.device else [])])
        else:
            srv = InProcess(run, sched, base, 512, args.max_batch_rows, prefix_cache=not args.no_prefix_cache)
        objectives = srv.objectives
        per: dict[str, Any] = {"rates": {}}
        try:
            one_request(srv.url, workload(1, objectives, 99, 0.0, temperature, **lengths)[0],
                        time.perf_counter() + 600)  # warm
            if not args.no_head_of_line:
                per["head_of_line"] = head_of_line(srv.url, objectives, temperature, **sizes.get("hol", {}))
                print(sched, "head of line", per["head_of_line"], flush=True)
            for rate in map(float, args.rates.split(",")):
                reqs = workload(args.requests, objectives, int(rate * 1000), args.long_share, temperature, **lengths)
                load = open_loop(srv.url, reqs, rate, args.burstiness, args.clients, int(rate * 1000),
                                args.max_seconds, args.drain_seconds)
                per["rates"][str(rate)] = summarise(load, args.slo_ttft, [float(t) for t in args.slo_tpot.split(",")])
                print(sched, rate, {k: v for k, v in per["rates"][str(rate)].items() if k != "requests"}, flush=True)
            if args.agreement and sched == "step":  # before the flood: its --max-queue would turn these into 429s
                per["agreement"] = agreement(srv.url, srv.engine, args.agreement, 16)
                print(sched, "agreement", per["agreement"], flush=True)
            if args.flood and sched == "step":
                srv.engine.max_queue = args.max_queue
                if args.kv_budget_mb:
                    srv.engine.kv_budget = int(args.kv_budget_mb * 2**20)
                per["flood"] = flood(srv.url, srv.engine, args.flood, args.flood_seconds, objectives,
                                     lengths.get("short", (24, 64)))
                print(sched, "flood", per["flood"], flush=True)
            per["stats"] = {k: v for k, v in srv.stats.items() if not isinstance(v, dict)}
        finally:
            srv.stop()
        results["schedulers"][sched] = per
    return results


if __name__ == "__main__":
    sys.exit(main())

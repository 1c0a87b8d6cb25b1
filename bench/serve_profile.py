"""Where the step scheduler's time goes: cProfile of its decode thread while ``--requests`` concurrent requests
(each its own weights, base-anchored hidden mix, ``--max-tokens`` new tokens) decode, loopback only.

    python bench/serve_profile.py --run runs/default --requests 8 --max-tokens 32
    python bench/serve_profile.py --quick       # 2 requests x 4 tokens on a tiny random run in a temp folder

Prints the top functions by cumulative and by own time, and the share of the thread's time spent in the model's
forward (``Runner._forward``) against the Python around it (scheduling, sampling, batch bookkeeping).
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import bench_parser, run_folder  # noqa: E402
from serve_load import InProcess, one_request, workload  # noqa: E402


def main() -> int:
    ap = bench_parser(__doc__, "2 requests x 4 new tokens, the top 5 functions")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.top = 2, 4, 5
    with run_folder(args, ap) as run:
        prof, steps, results = profile(run, args.requests, args.max_tokens)
    st = pstats.Stats(prof)
    total = st.total_tt
    fwd = sum(v[3] for k, v in st.stats.items() if k[2] == "_forward" and k[0].endswith("runner.py"))
    print(f"decode thread: {total:.2f} s over {steps} steps ({1000 * total / max(1, steps):.0f} ms/step); "
          f"Runner._forward {fwd:.2f} s ({100 * fwd / total:.0f}%), the rest {total - fwd:.2f} s")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue())
    if args.output:
        Path(args.output).write_text(json.dumps({"requests": args.requests, "max_tokens": args.max_tokens,
                                                 "completion_tokens": [r.get("tokens") for r in results],
                                                 "errors": [r["error"] for r in results], "steps": steps,
                                                 "thread_s": round(total, 3), "forward_s": round(fwd, 3)}, indent=1))
    return 0


def profile(run: Path, n: int, max_tokens: int) -> tuple[cProfile.Profile, int, list[dict]]:
    """Send ``n`` concurrent requests to an in-process step-scheduler server with its decode thread profiled;
    the profile, the decode steps taken and each request's result (``serve_load.one_request``)."""
    from emorl.config import load_config
    from emorl.models import load_base
    from emorl.serve import scheduler

    prof = cProfile.Profile()
    decode = scheduler.StepScheduler.run
    scheduler.StepScheduler.run = lambda self: prof.runcall(decode, self)  # the decode thread, profiled
    try:
        cfg = load_config(run / "config.yaml")
        srv = InProcess(str(run), "step", load_base(cfg.model), 512, 256)
        try:
            reqs = workload(n, srv.engine.objectives, 3, 0.0, cfg.eval.generation.temperature)
            results: list[dict] = [{}] * n
            for r in reqs:
                r["max_tokens"] = max_tokens

            def send(j: int) -> None:
                results[j] = one_request(srv.url, reqs[j], float("inf"))

            threads = [threading.Thread(target=send, args=(j,)) for j in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            steps = srv.engine.stats["steps"]
        finally:
            srv.stop()
    finally:
        scheduler.StepScheduler.run = decode  # the class is shared: a later server in this process runs unprofiled
    return prof, steps, results


if __name__ == "__main__":
    sys.exit(main())

"""Where the step scheduler's time goes: cProfile of its decode thread while ``--requests`` concurrent requests
(each its own weights, base-anchored hidden mix, ``--max-tokens`` new tokens) decode, loopback only.

    python bench/serve_profile.py --run runs/default --requests 8 --max-tokens 32

Prints the top functions by cumulative and by own time, and the share of the thread's time spent in the model's
forward (``Runner._forward``) against the Python around it (scheduling, sampling, batch bookkeeping).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_load import InProcess, one_request, workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    from emorl.config import load_config
    from emorl.models import load_base
    from emorl.serve import scheduler

    prof = cProfile.Profile()
    run = scheduler.StepScheduler.run
    scheduler.StepScheduler.run = lambda self: prof.runcall(run, self)  # the decode thread, profiled
    cfg = load_config(Path(args.run) / "config.yaml")
    srv = InProcess(args.run, "step", load_base(cfg.model), 512, 256)
    try:
        reqs = workload(args.requests, srv.engine.objectives, 3, 0.0, cfg.eval.generation.temperature)
        for r in reqs:
            r["max_tokens"] = args.max_tokens
        threads = [threading.Thread(target=one_request, args=(srv.url, r, float("inf"))) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = srv.engine.stats["steps"]
    finally:
        srv.stop()
    st = pstats.Stats(prof)
    total = st.total_tt
    fwd = sum(v[3] for k, v in st.stats.items() if k[2] == "_forward" and k[0].endswith("runner.py"))
    print(f"decode thread: {total:.2f} s over {steps} steps ({1000 * total / max(1, steps):.0f} ms/step); "
          f"Runner._forward {fwd:.2f} s ({100 * fwd / total:.0f}%), the rest {total - fwd:.2f} s")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

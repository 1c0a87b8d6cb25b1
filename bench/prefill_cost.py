"""What a burst's prefill costs against one request's, on this machine: the step scheduler's model forward
(``Runner._forward``: the LoRA bank in per-row mode, as ``emorl serve`` runs it) over the rows of 1 and of 4
requests x ``--positions`` prompt positions after a ``--context``-position cache (the statement after the
prompt-prefix cache: 16 of the head-of-line probe's 48-wide prompts), and one decode step of one request (what a
request arriving mid-step waits for at most); the median of ``--repeats``. A request is a hidden mix of the run's
objectives, one one-hot row per objective, as the head-of-line probe's are.

    python bench/prefill_cost.py --run runs/default
    python bench/prefill_cost.py --quick          # 1 and 2 requests, 1 repeat, on a tiny run in a temp folder

It bounds the head-of-line ratio of bench/serve_load.py from below: four requests that arrive together cannot get
their first tokens before their prefill forward ends, and a lone request's TTFT holds one request's forward plus
the server's fixed costs (HTTP, tokenising, sampling). Where the forward is compute-bound (a CPU), four requests'
forward costs about four times the positions' work, and the ratio cannot fall below forward(4) ÷ lone TTFT.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import bench_parser, run_folder  # noqa: E402


def measure(run: str, requests: list[int], positions: int, context: int, repeats: int) -> dict[str, Any]:
    import torch
    from transformers.cache_utils import DynamicCache

    from emorl.models import position_ids
    from emorl.serve import Engine
    from emorl.serve.runner import Runner

    engine = Engine(run, scheduler="step")
    try:
        slots = [engine.adapters.index(o) for o in engine.objectives]
        runner = Runner(engine.ens, engine.adapters, {})
        runner.hold()
        gen = torch.Generator().manual_seed(0)

        def timed(n_requests: int, new: int) -> float:
            """Median seconds of a forward of ``new`` positions for ``n_requests`` requests' rows after a
            ``context``-position cache."""
            rows = n_requests * len(slots)
            coef = torch.zeros(rows, len(engine.adapters))
            for r in range(rows):
                coef[r, slots[r % len(slots)]] = 1.0
            ids = torch.randint(100, 1000, (rows, context + new), generator=gen)
            mask = torch.ones_like(ids)
            pos = position_ids(mask)
            with torch.inference_mode():
                _, cache = runner._forward(ids[:, :context], mask[:, :context], pos[:, :context], coef,
                                           DynamicCache())
                caches = [copy.deepcopy(cache) for _ in range(repeats + 1)]
                times = []
                for c in caches:  # the first is a warm-up
                    t0 = time.perf_counter()
                    runner._forward(ids[:, context:], mask, pos[:, context:], coef, c)
                    times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

        out: dict[str, Any] = {"rows_per_request": len(slots), "positions": positions, "context": context,
                               "repeats": repeats, "prefill_s": {}, "step_s": round(timed(1, 1), 4)}
        for n in requests:
            out["prefill_s"][str(n)] = round(timed(n, positions), 4)
        runner.release()
    finally:
        engine.close()
    one = out["prefill_s"][str(requests[0])]
    out["prefill_ratio"] = {k: round(v / one, 2) for k, v in out["prefill_s"].items()}
    return out


def main() -> int:
    ap = bench_parser(__doc__, "1 and 2 requests, 1 repeat")
    ap.add_argument("--requests", default="1,4", help="request counts, comma-separated (the first is the reference)")
    ap.add_argument("--positions", type=int, default=16, help="prompt positions each request's prefill computes")
    ap.add_argument("--context", type=int, default=32, help="positions already in the cache (the shared prefix)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.repeats = "1,2", 1
    with run_folder(args, ap) as run:
        res = measure(str(run), [int(x) for x in args.requests.split(",")], args.positions, args.context,
                      args.repeats)
    print(json.dumps(res, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

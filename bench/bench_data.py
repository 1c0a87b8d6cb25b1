"""Data loading cost: the built-in task, and emorl's validating loaders next to plain stdlib parsing.

Run: ``python bench/bench_data.py`` (``--quick``: 200 rows, one repeat, a smoke run). Prints medians over repeats
and the ratio emorl / plain, measured side by side in this process (the plain version parses the same file with no
validation and no line numbers).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emorl import data

QUICK = "--quick" in sys.argv


def median_time(fn, repeats: int = 1 if QUICK else 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cold_default_records() -> float:
    """default_records() in a fresh interpreter (nothing cached), timed inside that process."""
    code = ("import time; from emorl import data; t=time.perf_counter(); r=data.default_records(); "
            "print(time.perf_counter()-t, len(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0])


def main() -> None:
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    cold = statistics.median(cold_default_records() for _ in range(1 if QUICK else 3))
    n = len(data.default_records())
    print(f"default_records (cold, fresh process): median {cold:.3f} s for {n} records "
          f"({len(data.handwritten_records())} written + {n - len(data.handwritten_records())} chitchat)")

    n_rows = 200 if QUICK else 8000
    with tempfile.TemporaryDirectory() as d:
        p8k = Path(d) / "psych8k.json"
        items = [{"instruction": "If you are a counsellor, answer.", "input": f"I have been feeling low, day {i}.",
                  "output": f"It sounds like day {i} was hard."} for i in range(n_rows)]
        p8k.write_text(json.dumps(items, indent=2), encoding="utf-8")
        pair = Path(d) / "pair.csv"
        with open(pair, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(data.PAIR_COLUMNS)
            for i in range(n_rows):
                w.writerow([f"I drink every night, number {i}, but it is fine.", f"hq a {i}", f"hq b {i}", "mq",
                            "l1", "l2", "l3", "l4", "l5"])

        def plain_json() -> list[data.Record]:
            return [data.Record(x["input"].strip(), x["output"].strip() or None)
                    for x in json.loads(p8k.read_text(encoding="utf-8"))]

        def plain_csv() -> list[data.Record]:
            with open(pair, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))[1:]
            return [data.Record(r[0].strip(), r[1]) for r in rows]

        assert [r.prompt for r in data.load_json_records(p8k, "input", "output")] == [r.prompt for r in plain_json()]
        for name, ours, plain in [
            (f"Psych8k JSON array, {n_rows} items", lambda: data.load_json_records(p8k, "input", "output"), plain_json),
            (f"PAIR CSV, {n_rows} rows", lambda: data.load_pair_csv(pair, seed=0), plain_csv),
        ]:
            t_ours, t_plain = median_time(ours), median_time(plain)
            print(f"{name}: emorl {t_ours * 1e3:.1f} ms, plain stdlib {t_plain * 1e3:.1f} ms, "
                  f"ratio {t_ours / t_plain:.2f}x")
        recs = data.load_json_records(p8k, "input", "output")
        t_split = median_time(lambda: data.split_records(recs, [0.8, 0.1, 0.1], seed=0))
        print(f"split_records, {n_rows} records: {t_split * 1e3:.1f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

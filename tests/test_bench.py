"""Benchmark scripts run at every commit: each one's quick mode on the tiny random model (or a stored study), checked
for running to the end and writing its outputs and figures. Timings are not checked (bench/RESULTS.md holds them).
Every script has one: bench/memory.py and bench/replies_end.py run in tests/test_memory.py and
tests/test_replies_end.py, the serving scripts in tests/test_bench_serve.py, trunk_study.py, executors.py and
matched_cost.py in tests/test_bench_study.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
STUDY = BENCH / "results" / "default-run9"  # a stored study: results.json and the adapters' emorl.json


def test_train_step_quick(tmp_path):
    """Our k-SCST step on the tiny model (the script's child processes measure peak RSS, so it runs as a process)."""
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "train_step.json").read_text())
    assert set(res) == {"ours"} and len(res["ours"]["step_s"]) == 2 and "ours: step" in proc.stdout


def test_decode_quick(script, tmp_path):
    out = script("decode", "--quick", "--json", str(tmp_path / "decode.json"))
    res = json.loads((tmp_path / "decode.json").read_text())
    assert {"a", "b", "c", "p", "anchored", "g_one", "g_sep"} <= set(res)
    assert "tokens (b) vs (p)" in out and "G=4 points" in out


def test_trunk_quick(script, tmp_path):
    """bench/trunk.py on the tiny model: it writes its JSON, and the top-layer mix really runs a shared trunk (layers
    below the adapted ones computed once per row group), the full-depth mix none."""
    out = script("trunk", "--quick", "--json", str(tmp_path / "trunk.json"))
    data = json.loads((tmp_path / "trunk.json").read_text())
    assert "decode B=4" in data and "mix/single" in out
    assert "'mix-top': 0" not in out and "'mix-full': 0" in out


def test_search_quick(script, tmp_path):
    script("search", "--quick", "--out", str(tmp_path), "--json", str(tmp_path / "search.json"))
    res = json.loads((tmp_path / "search.json").read_text())
    assert (tmp_path / "search_complexity.png").read_bytes().startswith(b"\x89PNG")
    assert len(res["complexity"]) == 4 * 7 and set(res["real"]["runs"]) == {"ours", "naive"}


def test_batch_invariance_quick(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(BENCH / "batch_invariance.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())
    assert [(r["dtype"], r["first"], r["prompts"]) for r in run["runs"]] == [("float32", 2, 4)]


def test_router_quick(script, tmp_path):
    script("router", "--out", str(tmp_path), "cost", "--model", "tiny-llama", "--prompts", "2")
    script("router", "--out", str(tmp_path), "synthetic")
    cost = json.loads((tmp_path / "router_cost.json").read_text())
    assert cost["model"] == "tiny-llama" and cost["prompts"] == 2 and cost["points"] > 1
    assert set(json.loads((tmp_path / "router_synthetic.json").read_text())) == {"knn", "ridge"}


def test_kl_coef_quick(script, tmp_path):
    script("kl_coef", "--quick", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "kl.json"))
    rows = json.loads((tmp_path / "kl.json").read_text())
    assert [r["kl_coef"] for r in rows] == [0.0, 0.05]


def test_bench_data_and_rewards_quick(script):
    assert "PAIR CSV, 200 rows" in script("bench_data", "--quick")
    out = script("bench_rewards", "--quick")
    assert "| fluency (SmolLM2-135M) |" in out and "| length |" in out


def test_study_table_and_training_curves_on_a_stored_study(script, tmp_path):
    out = script("study_table", str(STUDY))
    methods = json.loads((STUDY / "results.json").read_text())["methods"]
    assert sum(line.startswith("| ") for line in out.splitlines()) == len(methods) + 1  # a header, a row per method
    script("plot_train_curves", str(STUDY), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_run_default_compares_a_stored_study(script):
    out = script("run_default", "--run", str(STUDY))
    assert "== against the paper" in out and "EMORL - Uniform mean reward: ours" in out


def test_study_scripts_on_a_tiny_study(script, tiny_study, tmp_path):
    out = script("mix_entropy", str(tiny_study), "--weights", "1,0.5,0", "--prompts", "2", "--tokens", "4")
    assert out.count("mean entropy") == 2 + 3  # the mix, the uniform mix and each adapter alone
    script("search_generalises", "--run", str(tiny_study), "--top", "3", "--prompts", "2",
           "--out", str(tmp_path / "gen.json"))
    gen = json.loads((tmp_path / "gen.json").read_text())
    assert gen["table"] and "after_minus_before_on_test" in gen
    script("router", "--out", str(tmp_path), "compare", "--run", str(tiny_study), "--prompts", "2")
    assert "fit" in json.loads((tmp_path / "router_compare.json").read_text())
    table = script("study_table", str(tiny_study))
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 3  # header + base, emorl, uniform

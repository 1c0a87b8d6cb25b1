"""The whole-study benchmark scripts run at every commit: bench/trunk_study.py, executors.py and matched_cost.py, each
in its quick mode on the tiny random model, checked for running every stage to the end and writing its outputs (their
timings are bench/RESULTS.md's). bench/mix_entropy.py and search_generalises.py run in tests/test_bench.py."""

from __future__ import annotations

import json

import pytest

TINY_OBJECTIVES = ["reflection", "empathy", "fluency"]  # the tiny preset's (bench/trunk_study.py --quick keeps two)


def test_trunk_study_quick(script, tmp_path):
    """Every stage of the depth study: budgets (a probe at the shallow depth only), one run per depth with the chosen
    budget, and the comparison: full depth against itself is exactly 0, and each single adapter has its column."""
    out = script("trunk_study", "--quick", "--out", str(tmp_path))
    budgets = json.loads((tmp_path / "budgets.json").read_text())
    assert set(budgets) == {"1/2", "all"}
    assert [(b["lr"], b["r"]) for b in budgets.values()] == [(1e-3, 4)] * 2 and budgets["all"]["steps"] == 1
    assert (tmp_path / "train" / "1of2" / "probe").is_dir() and not (tmp_path / "train" / "all" / "probe").exists()
    for depth, spec, layers in (("1of2", "top:1/2", [1]), ("all", "all", "all")):  # the tiny model: 2 layers
        info = json.loads((tmp_path / "runs" / depth / "adapters" / "reflection" / "emorl.json").read_text())
        assert (info["extra"]["lora"]["layers"], info["extra"]["layers"]) == (spec, layers)
        assert info["steps"] == budgets[depth.replace("of", "/")]["steps"]  # the run trains the chosen budget

    study = json.loads((tmp_path / "study.json").read_text())
    assert list(study) == ["1/2", "all"]
    for row in study.values():
        assert set(row) == {"budget", "emorl - full", "emorl - uniform", "reflection: single - base",
                            "fluency: single - base", "emorl tokens/s", "search grid HV - full"}
        assert row["emorl tokens/s"] > 0
    assert study["all"]["emorl - full"]["mean"] == 0.0 and study["all"]["emorl - full"]["ci95"] == [0.0, 0.0]
    assert study["all"]["search grid HV - full"] is None  # full depth is the reference
    hv = study["1/2"]["search grid HV - full"]
    assert hv["points"] == 3 ** 2 - 1 and hv["prompts"] == 2 and hv["ci95"][0] <= hv["mean"] <= hv["ci95"][1]
    assert study["1/2"]["budget"] == budgets["1/2"]
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| depth", "| 1/2", "| all"]

    # the reduced study: full depth is that finished run (not retrained), the depth's run continues its budget folder
    reduced = tmp_path / "reduced"
    out = script("trunk_study", "--quick", "--out", str(reduced), "--full-run", str(tmp_path / "runs" / "all"),
                 "--depths", "1/2", "--probe-steps", "1", "--reduced-runs")
    budgets = json.loads((reduced / "budgets.json").read_text())
    assert list(budgets) == ["1/2"] and not (reduced / "train" / "all").exists() and not (reduced / "runs").exists()
    run = reduced / "train" / "1of2" / "lr0.001-r4"
    assert budgets["1/2"]["folder"] == str(run) and (run / "eval" / "replies" / "emorl.jsonl").exists()
    assert not (run / "eval" / "replies" / "dynaopt.jsonl").exists()  # --reduced-runs: what the comparison reads
    study = json.loads((reduced / "study.json").read_text())
    assert list(study) == ["1/2", "all"] and study["all"]["emorl - full"]["mean"] == 0.0


def test_executors_quick(script, tmp_path):
    """The local executor trains the tiny preset's K = 3 adapters and searches one round: 3^3 weight points."""
    out = script("executors", "--quick", "--json", str(tmp_path / "executors.json"))
    res = json.loads((tmp_path / "executors.json").read_text())
    assert list(res["runs"]) == ["tiny"]
    (row,) = res["runs"]["tiny"]["rows"]["local"]
    assert set(row) == {"start_s", "train_s", "search_s", "close_s", "total_s", "best", "points"}
    assert row["points"] == 3 ** 3 and 0.0 < row["best"] < 1.0
    assert "| phase | local |" in out and "| total |" in out and "ray" not in out


def test_matched_cost_quick(script, tiny_study, tmp_path):
    """Matched-cost adapters trained beside a tiny study (1 step each: max(1, 1 // 3)) and compared with it, paired;
    the prompts each consumed are steps x batch size (2) per policy."""
    script("matched_cost", "--quick", "--run", str(tiny_study), "--out", str(tmp_path / "matched.json"))
    res = json.loads((tmp_path / "matched.json").read_text())
    assert (res["n_adapters"], res["full_steps"], res["steps_per_adapter"]) == (3, 1, 1)
    assert res["prompts_consumed"] == {"matched emorl (all adapters)": 3 * 2, "uniform": 2,
                                       "emorl (equal steps, all adapters)": 3 * 2}
    metrics = {"mean_reward", *(f"score/{o}" for o in TINY_OBJECTIVES)}
    assert set(res["scores"]) == {"matched emorl", "uniform", "emorl (equal steps)"}
    assert all(set(s) == metrics for s in res["scores"].values())
    assert set(res["differences"]) == {"matched emorl - uniform", "matched emorl - emorl (equal steps)"}
    diff = res["differences"]["matched emorl - uniform"]["mean_reward"]["mean"]  # paired on the same units
    mine, uniform = res["scores"]["matched emorl"]["mean_reward"], res["scores"]["uniform"]["mean_reward"]
    assert diff == pytest.approx(mine - uniform)
    assert len(res["matched_weights"]) == 3
    matched = tiny_study.parent / "run-matched"
    assert sorted(p.name for p in (matched / "eval" / "replies").glob("*.jsonl")) == \
        ["emorl.jsonl", *(f"single:{o}.jsonl" for o in sorted(TINY_OBJECTIVES))]

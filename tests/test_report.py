"""The report from a hand-made run folder (no model): tables agree with results.json, figures are drawn,
search views are re-plotted from the points log, missing inputs are named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from emorl.models import AdapterInfo
from emorl.report import comparison_table, markdown, search_result, write_report
from emorl.report.tables import fmt_pm, improvement_table, weights_table
from emorl.search import PointStore, hierarchical_search
from emorl.utils import EmorlError, atomic_write_json

OBJS = ["reflection", "empathy"]


def stat(m, s=0.0, n=1):
    return {"mean": m, "std": s, "n": n}


def method(label, kind, scores, prompts, n=1, weights=None, search=None):
    summary = {f"score/{o}": stat(v, 0.01 * n, n) for o, v in zip(OBJS, scores, strict=True)}
    summary |= {"mean_reward": stat(float(np.mean(scores)), 0.02 * (n > 1), n), "diversity2": stat(0.61, 0, n),
                "diversity2_ref": stat(0.55, 0, n), "length_tokens": stat(21.5, 0, n), "tokens_per_s": stat(80, 0, n)}
    return {"label": label, "kind": kind, "summary": summary, "weights": weights, "search": search,
            "training": {"prompts": prompts, "wall_time_s": prompts / 10, "per_adapter": {}},
            "samples": [{"prompt": "I feel lost.", "reply": f"{label} | says hi"}]}


def results(n=1):
    return {"version": 1, "split": "test", "prompts": 8, "seeds": list(range(n)), "objectives": OBJS,
            "model": "tiny-llama", "generation": {"do_sample": n > 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                                  "max_new_tokens": 16},
            "methods": {
                "base": method("Base model", "base", [0.2, 0.3], 0, n),
                "single:reflection": method("reflection adapter alone", "adapter", [0.5, 0.25], 40, n),
                "uniform": method("Uniform Weighted", "adapter", [0.45, 0.5], 80, n),
                "emorl": method("EMORL", "ensemble", [0.5, 0.55], 80, n, {"reflection": 0.75, "empathy": 0.25},
                                {"wall_time_s": 12.0, "points": 13, "decoded": 9})}}


def fake_run(tmp_path, n=1):
    run = tmp_path / "run"
    atomic_write_json(run / "eval" / "results.json", results(n))
    curve = [{"step": s, "prompts": 4 * s, "value": 0.2 + 0.05 * s, "scores": {}} for s in range(0, 9, 4)]
    for sub, name, objs in [("adapters", "reflection", ["reflection"]), ("adapters", "empathy", ["empathy"]),
                            ("baselines", "uniform", OBJS)]:
        folder = run / sub / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        info = AdapterInfo(objective=name, objectives=objs, steps=8, prompts_consumed=32, wall_time_s=5.0,
                           converged=name == "empathy", curve=curve, extra={"stop_reason": "step budget (8)"})
        atomic_write_json(folder / "emorl.json", info.__dict__)
    # a real (analytic) hierarchical search log: hidden mode, no figures on disk yet
    store = PointStore(run / "search" / "hidden", {"names": OBJS, "mode": "hidden"})
    res = hierarchical_search(lambda w: [{"aggregate": float(-((p - [0.7, 0.3]) ** 2).sum()),
                                          "scores": {"reflection": float(p[0]), "empathy": float(1 - p[0])}}
                                         for p in w], 2, 3, store=store, progress=False)
    atomic_write_json(run / "search" / "hidden" / "best.json", res.to_json(OBJS) | {"wall_time_s": 1.5})
    return run, res


def test_fmt_pm_and_markdown():
    assert fmt_pm(stat(0.5, 0.0123, 3)) == "0.500 ± 0.012"
    assert fmt_pm(stat(0.5, 0.0, 1)) == "0.500"  # one seed: no spread to show
    assert fmt_pm(None) == "–"
    assert markdown(["a", "b"], [["x|y", "1"]]) == "| a | b |\n|---|---:|\n| x\\|y | 1 |"


def test_comparison_table_rows_follow_results():
    cols, rows = comparison_table(results(3))
    assert cols[:4] == ["Method", "reflection", "empathy", "Mean reward"]
    assert [r[0] for r in rows] == ["Base model", "reflection adapter alone", "Uniform Weighted", "EMORL"]
    emorl = rows[-1]
    assert emorl[1] == "0.500 ± 0.030" and emorl[3] == "0.525 ± 0.020"
    assert emorl[cols.index("Prompts consumed")] == "80" and emorl[cols.index("Search time / points")] == "12 s / 13"
    assert rows[0][cols.index("Search time / points")] == "–"


def test_improvement_table_pairs_base_and_single_adapters():
    cols, rows = improvement_table(results())
    assert rows == [["reflection", "0.200", "0.500", "+0.300", "0.375"]]  # no single:empathy method -> no row
    r = results()
    del r["methods"]["base"]
    assert improvement_table(r) is None


def test_weights_table_marks_a_replaced_point():
    search = {"hidden": {"names": OBJS, "weights": {"reflection": 0.0, "empathy": 0.0}, "aggregate": 0.0,
                         "points": 9, "decoded": 5, "wall_time_s": 2.0}}
    _, rows = weights_table(search, {"hidden": {"reflection": 0.5, "empathy": 0.0}})
    assert rows[0][:3] == ["hidden*", "0.500", "0.000"]
    _, rows = weights_table(search)
    assert rows[0][:3] == ["hidden", "0.000", "0.000"]


def test_search_result_rebuilt_from_the_log(tmp_path):
    run, res = fake_run(tmp_path)
    back = search_result(run / "search" / "hidden")
    assert back.weights == res.weights and back.aggregate == res.aggregate
    assert {p.weights for p in back.points} == {p.weights for p in res.points}
    assert [(r.lo, r.side, r.kept_offset) for r in back.rounds] == [(r.lo, r.side, r.kept_offset) for r in res.rounds]


def test_write_report_from_a_run_folder(tmp_path):
    run, _ = fake_run(tmp_path, n=3)
    path = write_report(run)
    text = path.read_text()
    summary = json.loads((run / "results.json").read_text())
    table = summary["tables"]["comparison"]
    assert markdown(table["columns"], table["rows"]) in text
    assert "0.525 ± 0.020" in text and "3 seeds (0, 1, 2)" in text
    assert "| reflection | 0.200 ± 0.030 | 0.500 ± 0.030 | +0.300 |" in text  # the improvement table
    assert summary["policies"]["EMORL: reflection"]["last_value"] == pytest.approx(0.6)
    assert list(summary["policies"]) == ["EMORL: reflection", "EMORL: empathy", "Uniform Weighted"]
    rounds = json.loads((run / "search" / "hidden" / "best.json").read_text())["rounds"]
    assert summary["search"]["hidden"]["history"] == [r["best_aggregate"] for r in rounds]
    for f in ["training_curves", "results_scatter", "tradeoffs", "search_modes", "search_hidden_history",
              "search_hidden_landscape", "search_hidden_weights"]:
        data = (run / "figures" / f"{f}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, f
        assert f"figures/{f}.png" in summary["figures"]
    assert (run / "search" / "hidden" / "history.png").exists()  # re-plotted from the log
    assert "**Prompt 1.** I feel lost." in text and "*EMORL*: EMORL | says hi" in text
    # sampled evaluation: the search's trade-off view is not overlaid, and the note says how each decoded
    assert "the search used settings it did not record and the evaluation sampling (up to 16 new tokens)" in text


def test_report_needs_evaluation_results(tmp_path):
    with pytest.raises(EmorlError, match="emorl evaluate --run"):
        write_report(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{oops")
    with pytest.raises(EmorlError, match="corrupt JSON"):
        write_report(tmp_path)


def test_report_states_which_differences_are_resolved(tmp_path):
    from emorl.report.tables import differences_table

    res = results(1)
    res["methods"]["uniform"]["summary"]["mean_reward"]["ci95"] = [0.45, 0.5]
    res["methods"]["uniform"]["differences"] = {"emorl": {"mean_reward": {"mean": -0.05, "ci95": [-0.08, -0.02],
                                                                          "resolved": True}}}
    res["methods"]["base"]["differences"] = {"emorl": {"mean_reward": {"mean": -0.02, "ci95": [-0.06, 0.01],
                                                                       "resolved": False}}}
    res["bootstrap"] = {"n_units": 8, "resamples": 2000}
    assert fmt_pm(res["methods"]["uniform"]["summary"]["mean_reward"]) == "0.475 [0.450, 0.500]"
    cols, rows = differences_table(res)
    assert cols == ["Method", "minus", "Mean reward", *OBJS]
    assert rows[0][:3] == ["Base model", "EMORL", "-0.020 [-0.060, +0.010] (n.s.)"]
    assert rows[1][:3] == ["Uniform Weighted", "EMORL", "-0.050 [-0.080, -0.020]"]
    run, _ = fake_run(tmp_path)
    atomic_write_json(run / "eval" / "results.json", res)
    text = write_report(run).read_text()
    assert "### Paired differences" in text and "8 (prompt, seed) units, 2000 resamples" in text
    assert "Resolved differences to EMORL (95% CI excludes 0): Uniform Weighted -0.050 [-0.080, -0.020]." in text
    assert "Not resolved against EMORL" in text and "Base model -0.020 [-0.060, +0.010]" in text


def test_a_stored_study_without_adapter_weights_still_lists_its_policies(tmp_path):
    """bench/results/ keeps each policy's emorl.json but not its weights; the report's training table reads only
    emorl.json, so `emorl report` on a stored study re-derives it."""
    import json

    from emorl.models import AdapterInfo
    from emorl.report.render import collect_policies

    for kind, name, info in [("adapters", "reflection", AdapterInfo(objective="reflection", steps=8)),
                             ("baselines", "uniform", AdapterInfo(objective="reflection+empathy", strategy="uniform",
                                                                  objectives=["reflection", "empathy"], steps=8))]:
        (tmp_path / kind / name).mkdir(parents=True)
        (tmp_path / kind / name / "emorl.json").write_text(json.dumps(info.__dict__))
    (tmp_path / "adapters" / "half-written").mkdir()  # no emorl.json: not a policy
    (tmp_path / "adapters" / ".reflection.old-123").mkdir()  # a replaced copy left by a killed atomic write
    (tmp_path / "adapters" / ".reflection.old-123" / "emorl.json").write_text("{}")
    got = collect_policies(tmp_path, ["reflection", "empathy"])
    assert list(got) == ["EMORL: reflection", "Uniform Weighted"]
    assert got["Uniform Weighted"]["objectives"] == ["reflection", "empathy"] and got["EMORL: reflection"]["steps"] == 8


def test_without_a_hidden_search_no_search_points_are_claimed(tmp_path):
    run, _ = fake_run(tmp_path, n=1)  # a greedy evaluation: the overlay would apply if a hidden search had run
    shutil.rmtree(run / "search" / "hidden")
    text = write_report(run).read_text()
    assert json.loads((run / "results.json").read_text())["tradeoff_background"] is False
    assert "No hidden-mixing search ran" in text and "grey points" not in text


def test_front_table_keeps_small_hypervolumes_visible():
    from emorl.report.tables import front_table

    hidden = {"points": 27, "front": [0, 1], "hypervolume": 0.0038, "hypervolume_ci95": [1.7e-5, 0.0093]}
    uniform = {"label": "Uniform Weighted", "fronts": {"hidden": {"verdict": "dominated"}}}
    front = {"modes": {"hidden": hidden}, "one_policy": {"uniform": uniform}}
    _, rows = front_table(front)
    assert rows == [["hidden", "27", "2", "0.0038 [1.7e-05, 0.0093]", "Uniform Weighted"]]

"""The serving benchmarks' quick modes (bench/serve.py, serve_load.py, serve_finish.py, serve_profile.py,
prefill_cost.py) on the tiny study, loopback only: each runs to the end and writes what it says, with counts a
person can check (every request sent is answered, both schedulers measured, same seed gives the same reply). Timings
are not checked. Not run here: serve_load.py --flood-process (it starts `emorl serve` in its own process, ~30 s;
tests/test_serve.py starts one) and --quick without --run (it makes the study itself with `emorl run`, ~30 s; the
tiny_study fixture is that study)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_serve_quick(script, tiny_study, tmp_path):
    """Each client count's 4 requests answered twice (concurrently, then one at a time) with the same replies."""
    out = script("serve", "--quick", "--run", str(tiny_study), "--output", str(tmp_path / "serve.json"))
    res = json.loads((tmp_path / "serve.json").read_text())
    assert [r["clients"] for r in res["levels"]] == [1, 2]
    for r in res["levels"]:
        both = r["concurrent"], r["one_at_a_time"]
        assert r["requests"] == 4 and [b["answered"] for b in both] == [4, 4] and r["identical_replies"]
        assert both[0]["tokens"] == both[1]["tokens"] and 4 <= both[0]["tokens"] <= 4 * 8  # same replies, same lengths
    assert r["steps"] > 0  # the step scheduler decoded the concurrent requests
    assert sum(line.startswith("| 1 |") or line.startswith("| 2 |") for line in out.splitlines()) == 2


def test_serve_load_quick(script, tiny_study, tmp_path):
    """Both schedulers, both rates: every request sent is completed within its max_tokens; the head-of-line probe,
    the agreement with generate and the flood run on the step scheduler."""
    script("serve_load", "--quick", "--run", str(tiny_study), "--output", str(tmp_path / "load.json"))
    res = json.loads((tmp_path / "load.json").read_text())
    assert set(res["schedulers"]) == {"step", "window"}
    for sched, per in res["schedulers"].items():
        assert set(per["rates"]) == {"8.0", "16.0"}, sched
        for rate in per["rates"].values():
            assert (rate["sent"], rate["completed"], rate["failed"], len(rate["requests"])) == (3, 3, 0, 3)
            for r in rate["requests"]:  # --quick draws 4-8 or 12-16 tokens; a reply stops at EOS or at max_tokens
                assert 4 <= r["max_tokens"] <= 16 and r["error"] is None
                assert r["tokens"] == r["max_tokens"] if r["finish"] == "length" else r["tokens"] <= r["max_tokens"]
        hol = per["head_of_line"]
        assert 1 <= hol["long_tokens"] <= 16 and hol["lone_ttft"] > 0 and hol["short_ttft_max"] > 0
        assert hol["bursts"] == len(hol["ratios"]) == 1 and hol["ratio"] == max(hol["ratios"])
        assert hol["four_alone_ttft_max"] > 0  # the four short requests with nothing in front: their own prefill
        assert hol["behind_long_vs_alone"] == pytest.approx(hol["short_ttft_max"] / hol["four_alone_ttft_max"],
                                                            rel=0.02, abs=0.01)
    step, window = res["schedulers"]["step"], res["schedulers"]["window"]
    assert step["agreement"] == {**step["agreement"], "requests": 3, "identical": 3}  # served greedy = generate
    flood = step["flood"]
    assert flood["requests"] == 6 and flood["served"] + flood["429"] == 6 and flood["other"] == 0
    assert flood["max_queue"] == 1 and flood["served"] >= 1
    assert "agreement" not in window and "flood" not in window and step["stats"]["steps"] > 0


def test_serve_load_own_process_quick(script, tiny_study, tmp_path):
    """--own-process: the step scheduler's server as `emorl serve` in its own process answers both rates and the
    head-of-line probe over loopback, and the parts that read the in-process engine are left out."""
    script("serve_load", "--quick", "--own-process", "--schedulers", "step", "--run", str(tiny_study), "--output",
           str(tmp_path / "own.json"))
    per = json.loads((tmp_path / "own.json").read_text())["schedulers"]["step"]
    assert all((r["sent"], r["completed"], r["failed"]) == (3, 3, 0) for r in per["rates"].values())
    assert per["head_of_line"]["bursts"] == 1 and per["stats"]["steps"] > 0  # /health's stats of that process
    assert "agreement" not in per and "flood" not in per


def test_serve_finish_quick(script, tiny_study, tmp_path):
    """The share of EOS-ended replies at L = 8, 16 for 2 prompts: a share of 2, never falling as L grows, and the
    smallest L the script names is the first at which both methods reach 95%."""
    script("serve_finish", "--quick", "--run", str(tiny_study), "--output", str(tmp_path / "finish.json"))
    res = json.loads((tmp_path / "finish.json").read_text())
    best = json.loads((tiny_study / "search" / "hidden" / "best.json").read_text())
    assert res["prompts"] == 2 and res["max_tokens"] == 16 and set(res["weights"]) == set(best["weights"])
    for m in ("emorl", "base"):
        share = res[m]["eos_share"]
        assert list(share) == ["8", "16"] and all(v in (0.0, 0.5, 1.0) for v in share.values())
        assert share["8"] <= share["16"]
    both = [L for L in (8, 16) if min(res[m]["eos_share"][str(L)] for m in ("emorl", "base")) >= 0.95]
    assert res["smallest_max_tokens"] == (both[0] if both else None)


def test_serve_profile_quick(script, tiny_study, tmp_path):
    """2 requests of 4 tokens through the profiled decode thread; the profiling patch is undone afterwards (the
    scheduler class is shared by every server in the process)."""
    from emorl.serve import scheduler

    run = scheduler.StepScheduler.run
    out = script("serve_profile", "--quick", "--run", str(tiny_study), "--output", str(tmp_path / "profile.json"))
    res = json.loads((tmp_path / "profile.json").read_text())
    assert res["completion_tokens"] == [4, 4] and res["errors"] == [None, None]
    assert res["steps"] >= 3  # the first token comes with the prefill, one decode step for each of the other 3
    assert 0 < res["forward_s"] <= res["thread_s"] and "Runner._forward" in out
    assert scheduler.StepScheduler.run is run


def test_prefill_cost_quick(script, tiny_study, tmp_path):
    """The forward of 1 and of 2 requests' rows (one per objective) after a cached context, and a decode step:
    positive times, and the ratio is the second over the first."""
    script("prefill_cost", "--quick", "--run", str(tiny_study), "--output", str(tmp_path / "cost.json"))
    res = json.loads((tmp_path / "cost.json").read_text())
    assert res["rows_per_request"] == 3 and res["positions"] == 16 and res["step_s"] > 0
    assert set(res["prefill_s"]) == {"1", "2"} and all(v > 0 for v in res["prefill_s"].values())
    assert res["prefill_ratio"]["2"] == pytest.approx(res["prefill_s"]["2"] / res["prefill_s"]["1"], abs=0.01)


@pytest.mark.parametrize("name", ["serve", "serve_load", "serve_finish", "serve_profile", "prefill_cost"])
def test_serve_scripts_ask_for_a_run_or_quick(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py")])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
    assert e.value.code == 2 and "give --run RUN or --quick" in capsys.readouterr().err

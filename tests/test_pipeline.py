"""``emorl run`` on the tiny preset: every stage runs, a run stopped between stages resumes without redoing
finished stages, a rerun skips everything, the report agrees with results.json, an added objective leaves the
other adapters untouched and joins the ensemble."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from emorl.config import load_config
from emorl.pipeline import make_plan, run_pipeline
from emorl.utils import EmorlError


def tree_hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def statuses(plan) -> dict[str, str]:
    return {f"{s.stage}/{s.name}": s.status for s in plan.steps}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset, stopped after the baselines stage (as a Ctrl-C between stages would), then resumed
    with training forbidden: the resume must not train anything again."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    seen: list[str] = []

    def stop_after(stage: str) -> None:
        seen.append(stage)
        if stage == "baselines":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_config("tiny"), run, progress=False, after_stage=stop_after)
    assert seen == ["train", "baselines"]
    assert not (run / "search").exists() and not (run / "report.md").exists()
    trained = tree_hashes(run / "adapters", run / "baselines")

    from emorl.train.trainer import Trainer

    def no_training(self, resume=False):
        raise AssertionError("a finished stage was trained again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train", no_training)
        plan = run_pipeline(load_config("tiny"), run, resume=True, progress=False)
    return {"run": run, "plan": plan, "trained": trained}


def test_resume_after_an_interruption_redoes_nothing_finished(tiny_run):
    run, plan = tiny_run["run"], tiny_run["plan"]
    st = statuses(plan)
    assert all(st[f"train/{o}"] == "done" for o in ("reflection", "empathy", "fluency"))
    assert st["baselines/uniform"] == st["baselines/dynaopt"] == "done"
    assert {st[f"search/{m}"] for m in ("hidden", "hidden-convex", "params", "params-convex")} == {"run"}
    assert tree_hashes(run / "adapters", run / "baselines") == tiny_run["trained"]
    stages = json.loads((run / "stages.json").read_text())["stages"]
    assert set(stages) == {"train", "baselines", "search", "evaluate", "report"}
    env = json.loads((run / "stages.json").read_text())["environment"]  # what the numbers were computed on
    assert env["dtype"] == "float32" and env["torch"] == __import__("torch").__version__ and env["cpu"]
    assert f"torch {env['torch']}" in (run / "report.md").read_text()
    for mode in ("hidden", "hidden-convex", "params", "params-convex"):
        assert (run / "search" / mode / "best.json").exists()


def test_report_table_matches_results_json(tiny_run):
    run = tiny_run["run"]
    summary = json.loads((run / "results.json").read_text())
    evald = json.loads((run / "eval" / "results.json").read_text())
    assert list(evald["methods"]) == ["base", "emorl", "emorl-convex", "uniform", "dynaopt", "soups", "soups-avg"]
    text = (run / "report.md").read_text()
    block = text.split("## Comparison", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
    header, body = rows[0], rows[2:]
    table = summary["tables"]["comparison"]
    assert header == table["columns"] and body == table["rows"]
    col = {name: i for i, name in enumerate(header)}
    for row, m in zip(body, evald["methods"].values(), strict=True):
        s = m["summary"]
        assert row[0] == m["label"]
        def ci(stat):  # the mean and its paired-bootstrap 95% CI over (prompt, seed)
            return f"{stat['mean']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}]"

        assert row[col["Mean reward"]] == ci(s["mean_reward"])
        for o in evald["objectives"]:
            assert row[col[o]] == ci(s[f"score/{o}"])
        assert row[col["Diversity-2"]] == f"{s['diversity2']['mean']:.3f}"
        assert row[col["Prompts consumed"]] == f"{m['training']['prompts']:,}"
    emorl = evald["methods"]["emorl"]["training"]
    assert emorl["prompts"] == sum(a["prompts"] for a in emorl["per_adapter"].values()) > 0
    assert summary["samples"] and set(summary["samples"][0]["replies"]) == {m["label"] for m in
                                                                           evald["methods"].values()}


def test_figures_exist_and_are_pngs(tiny_run):
    figs = tiny_run["run"] / "figures"
    names = ["training_curves", "results_scatter", "tradeoffs", "search_modes",
             *(f"search_{m}_{v}" for m in ("hidden", "hidden-convex", "params", "params-convex")
               for v in ("history", "weights"))]
    for n in names:
        data = (figs / f"{n}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, n
    listed = json.loads((tiny_run["run"] / "results.json").read_text())["figures"]
    assert {f"figures/{n}.png" for n in names} <= set(listed)


def test_rerun_skips_every_stage_without_loading_a_model(tiny_run, monkeypatch):
    run = tiny_run["run"]
    before = tree_hashes(run / "eval", run / "search") | {"report": (run / "results.json").read_text()}

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although every stage is up to date")

    monkeypatch.setattr("emorl.models.load_base", no_model)
    plan = run_pipeline(load_config("tiny"), run, progress=False)
    assert set(statuses(plan).values()) == {"done"}
    assert tree_hashes(run / "eval", run / "search") | {"report": (run / "results.json").read_text()} == before


def test_a_changed_setting_redoes_only_what_depends_on_it(tiny_run):
    run = tiny_run["run"]
    st = statuses(make_plan(load_config("tiny", ["eval.prompts=4"]), run))
    assert st.pop("evaluate/base, emorl, emorl-convex, uniform, dynaopt, soups, soups-avg") == "run"
    assert st.pop("report/report.md, results.json, figures/") == "run"
    assert set(st.values()) == {"done"}
    st = statuses(make_plan(load_config("tiny", ["search.prompts=3"]), run))
    assert [k for k, v in st.items() if v == "done"] == [f"train/{o}" for o in ("reflection", "empathy", "fluency")] \
        + ["baselines/uniform", "baselines/dynaopt"]
    plan = make_plan(load_config("tiny", ["train.lr=0.01"]), run)
    assert all(s.status == "redo" and "train.lr" in s.reason for s in plan.stage("train"))


def test_adding_an_objective_leaves_the_other_adapters_byte_identical(tiny_run, tmp_path):
    from emorl.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    before = tree_hashes(*(run / "adapters" / o for o in ("reflection", "empathy", "fluency")))
    rc = main(["train", "--run", str(run), "--objectives", "brief", "--no-progress",
               "objectives.brief={type: length, target: 6}"])
    assert rc == 0 and (run / "adapters" / "brief" / "adapter_model.safetensors").exists()
    assert tree_hashes(*(run / "adapters" / o for o in ("reflection", "empathy", "fluency"))) == before
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.trained_objectives() == ["reflection", "empathy", "fluency", "brief"]  # search uses all K+1
    plan = make_plan(cfg, run, resume=True)
    assert plan.objectives == ["reflection", "empathy", "fluency", "brief"]
    st = statuses(plan)
    assert [st[f"train/{o}"] for o in plan.objectives] == ["done"] * 4
    assert st["baselines/uniform"] == "redo" and "brief" in plan.stage("baselines")[0].reason
    assert {st[f"search/{m}"] for m in ("hidden", "hidden-convex", "params", "params-convex")} == {"redo"}


def test_bad_plans_fail_before_any_model_loads(tmp_path):
    with pytest.raises(EmorlError, match="unknown method"):
        make_plan(load_config("tiny", ["eval.methods=[base, emorl, soup]"]), tmp_path)
    with pytest.raises(EmorlError, match="name of a baseline"):
        make_plan(load_config("tiny", ["objectives={uniform: {type: length}}"]), tmp_path)


def test_cli_continues_a_run_folder_with_its_own_config(tmp_path):
    from emorl.pipeline import resolve

    run = tmp_path / "r"
    load_config("tiny", ["eval.prompts=5"]).save((run.mkdir() or run) / "config.yaml")
    ns = argparse.Namespace(config=None, preset=None, output=str(run), overrides=["eval.seeds=[0,1]"], seeds=None,
                            prompts=None, sample=False)
    cfg, where = resolve(ns)
    assert where == run and cfg.model.name == "tiny-llama" and cfg.eval.prompts == 5 and cfg.eval.seeds == [0, 1]
    ns.preset, ns.output, ns.seeds = "tiny", None, 3
    cfg, where = resolve(ns)
    assert where == Path("runs/tiny") and cfg.eval.seeds == [0, 1, 2]
    assert re.fullmatch(r"runs/tiny", str(where))


def test_settings_diff_names_keys_and_ignores_options_added_since():
    from emorl.pipeline import changed

    old = {"train": {"lr": 0.001, "k": 2}, "rewards": {"a": {"type": "length"}}}
    assert changed(old, {"train": {"lr": 0.001, "k": 2, "autocast": True}, "rewards": {"a": {"type": "length"}}}) \
        is None  # a config option added later (its default keeps the old behaviour)
    assert changed(old, {"train": {"lr": 0.01, "k": 2}, "rewards": {}}) == \
        "settings changed: rewards.a.type, train.lr"
    assert changed(None, old).startswith("made by an earlier version")


def test_estimate_counts_each_mix_by_its_streams():
    """A base-anchored mix decodes K + 1 streams, a convex one K, parameter mixes one merged stream (whose prefill
    is re-run for every weight point; the other mixes share it)."""
    from emorl.pipeline.estimate import stream_width

    assert stream_width("hidden", "base", 3) == (4, True)
    assert stream_width("hidden", "none", 3)[0] == 3
    assert stream_width("hidden-convex", "base", 3)[0] == 3
    assert stream_width("probs", "base", 3)[0] == 3
    assert stream_width("params", "base", 3) == (1, False)
    assert stream_width("params-convex", "base", 3)[0] == 1
    assert stream_width(None, "base", 3)[0] == 1


def test_reward_probe_times_one_reply_per_reward(monkeypatch):
    """The estimate's reward cost is probed with the run's own rewards: seconds per (reply, reward)."""
    import importlib

    est = importlib.import_module("emorl.pipeline.estimate")

    now = [0.0]
    monkeypatch.setattr(est.time, "perf_counter", lambda: now[0])

    def slow(prompts, responses):  # 0.01 s per reply
        now[0] += 0.01 * len(prompts)
        return np.full(len(prompts), 0.5)

    assert est.probe_rewards({"a": slow, "b": slow}) == pytest.approx(0.01)


def test_evaluate_estimate_counts_judges_kl_and_extra_sets(tmp_path):
    """The evaluation's estimate includes what eval.judges, eval.kl and eval.extra_sets add (they made the default
    study's evaluation 15 min where the plan said 6): by hand with a decode step of 1 s, no prefill, 0.5 s per
    (reply, scorer)."""
    from emorl.pipeline.estimate import DECODE_FACTOR, Speed, estimate
    from emorl.pipeline.plan import make_plan

    def evaluate_s(sets):
        cfg = load_config("tiny", ["eval.methods=[base]", "eval.prompts=4", "eval.generation.max_new_tokens=2",
                                   "eval.seeds=[0]", *sets])
        plan = make_plan(cfg, tmp_path / "run")
        estimate(plan, Speed(a=1.0, b=0.0, reward_s=0.5))
        return plan.todo("evaluate")[0].estimate_s

    n_obj = len(load_config("tiny").objectives)
    plain = evaluate_s([])
    assert plain == pytest.approx(DECODE_FACTOR * 2 + 4 * 0.5 * n_obj)  # 2 steps; 4 replies x the objectives
    judged = evaluate_s(['eval.judges={j: {type: length}}'])
    assert judged - plain == pytest.approx(4 * 0.5)  # one more scorer of the 4 replies
    # the KL comes from the evaluation's own decode: only the base's forward over 2 replies, no second decode
    assert evaluate_s(["eval.kl=true", "eval.kl_prompts=2"]) - plain == pytest.approx(2 * 0.5)
    extra = evaluate_s(['eval.extra_sets={more: {path: x.jsonl, prompts: 3}}'])
    assert extra - plain == pytest.approx(DECODE_FACTOR * 2 + 3 * 0.5 * n_obj)
    # a set that names its methods adds nothing for the others
    assert evaluate_s(['eval.extra_sets={more: {path: x.jsonl, prompts: 3, methods: [emorl]}}']) == pytest.approx(plain)

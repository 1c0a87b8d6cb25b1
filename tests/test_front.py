"""The front stage on a tiny run: lattice, files and figure written, hypervolume and dominance consistent with the
stored points, reuse of unchanged lattices, and the anchor pass-through."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emorl.config import load_config
from emorl.evaluate import evaluate_run
from emorl.front import front_run
from emorl.front.lattice import box_lattice, score_lattice
from emorl.models import AdapterInfo, add_adapters, save_adapter
from emorl.utils import EmorlError, atomic_write_json

OBJECTIVES = "objectives={short: {type: length, target: 3}, long: {type: length, target: 12}}"


def make_run(tmp_path, base):
    cfg = load_config("tiny", [OBJECTIVES, "eval.prompts=4", "eval.seeds=[0, 1]", "front.step=0.5",
                               "front.modes=[hidden, params]"])
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    names = ["short", "long", "uniform"]
    add_adapters(base, names, cfg.lora)
    for n, p in base.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    for n in names:
        folder = run / ("baselines" if n == "uniform" else "adapters") / n
        save_adapter(base.model, n, folder, AdapterInfo(objective=n, base=base.identity, extra={"finished": True}))
    atomic_write_json(run / "search" / "hidden" / "best.json", {"names": ["short", "long"],
                                                                "weight_vector": [0.75, 0.25]})
    return cfg, run


def _better(a, b) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def _front(points) -> list:
    """The non-dominated points, by the definition (every pair compared)."""
    return [tuple(p) for p in points if not any(_better(q, p) for q in points)]


def _verdict(points, p) -> str:
    front = _front(points)
    return "dominated" if any(_better(q, p) for q in front) else "dominates" if any(_better(p, q) for q in front) \
        else "incomparable"


def _hv2(points, ref) -> float:
    """2-D hypervolume as one draws it: sweep the points by falling first objective, add each new strip."""
    total, top = 0.0, ref[1]
    for x, y in sorted((tuple(p) for p in points if p[0] > ref[0] and p[1] > ref[1]), reverse=True):
        if y > top:
            total, top = total + (x - ref[0]) * (y - top), y
    return total


def test_naive_references_by_hand():
    assert _hv2([[2, 1], [1, 2], [0.5, 0.5]], [0, 0]) == 3  # 2x1 + 1x2 - the 1x1 overlap
    assert _front([[2, 1], [1, 2], [0.5, 0.5]]) == [(2, 1), (1, 2)]
    assert [_verdict([[2, 1], [1, 2]], p) for p in ([1, 1], [3, 0], [3, 3])] == ["dominated", "incomparable",
                                                                                  "dominates"]


def test_analyse_by_hand():
    """Two units; every point and the base reference move by the same offset on unit 2 (+0.2 on both objectives),
    so every bootstrap resample shifts points and reference alike and the hypervolume never changes: each CI is the
    point value, hand-computed. A reference resampled apart from the points would widen it."""
    from emorl.front.run import analyse

    def point(x, y):
        return {"weights": [x, y], "scores": {"x": x + 0.1, "y": y + 0.1}, "searched": False,
                "units": {"x": [x, x + 0.2], "y": [y, y + 0.2]}}

    modes = {"a": {"mode": "hidden", "anchor": "base", "points": [point(0.6, 0.2), point(0.2, 0.6)]},
             "b": {"mode": "params", "anchor": "base", "points": [point(0.4, 0.4)]}}

    def method(x, y):
        return {"kind": "adapter", "label": f"at {x},{y}", "summary": {"score/x": {"mean": x}, "score/y": {"mean": y}}}

    results = {"methods": {"low": method(0.4, 0.2), "side": method(0.6, 0.4), "high": method(0.8, 0.8),
                           "base": {"kind": "base"}}}
    out = analyse(results, modes, np.array([[0.0, 0.0], [0.2, 0.2]]), ["p", "q"], ["x", "y"], resamples=200)
    assert out["reference"]["scores"] == pytest.approx({"x": 0.1, "y": 0.1})
    a, b = out["modes"]["a"], out["modes"]["b"]
    assert a["hypervolume"] == pytest.approx(0.6 * 0.2 + 0.2 * 0.6 - 0.2 * 0.2)  # 0.20: two strips, one overlap
    assert b["hypervolume"] == pytest.approx(0.4 * 0.4)
    assert a["hypervolume_ci95"] == pytest.approx([0.20, 0.20]) and b["hypervolume_ci95"] == pytest.approx([0.16] * 2)
    d = out["hypervolume_differences"]["a - b"]
    assert d["mean"] == pytest.approx(0.04) and d["ci95"] == pytest.approx([0.04, 0.04]) and d["resolved"]
    verdicts = {n: (v["fronts"]["a"]["verdict"], v["fronts"]["b"]["verdict"]) for n, v in out["one_policy"].items()}
    assert verdicts == {"low": ("dominated", "dominated"), "side": ("incomparable", "incomparable"),
                        "high": ("dominates", "dominates")}


def test_lattice_and_modes():
    pts = box_lattice(2, 0.5, 1.0)
    assert pts.tolist() == [[0, 0.5], [0, 1], [0.5, 0], [0.5, 0.5], [0.5, 1], [1, 0], [1, 0.5], [1, 1]]
    assert len(box_lattice(3, 0.25, 1.0)) == 5 ** 3 - 1


def test_convex_lattice_points_share_a_ray_decode_anchored_ones_do_not():
    calls = []

    class Fake:
        def generate(self, prompts, weights, **kw):
            calls.append(kw)
            return [["ab"] * len(prompts) for _ in weights]

    class Length:
        def __call__(self, prompts, replies):
            return np.array([len(r) / 10 for r in replies])

    gen = load_config("tiny").eval.generation
    pts = np.array([[1.0, 0.0], [2.0, 0.0], [0.5, 0.5]])
    u = score_lattice(Fake(), pts, ["p", "q"], [0], {"len": Length()}, gen, mode="hidden", anchor="none")
    assert calls[0]["anchor"] == "none"
    assert len(calls) == 1 and u.shape == (3, 2, 1) and np.allclose(u, 0.2)
    score_lattice(Fake(), pts, ["p"], [0, 1], {"len": Length()}, gen, mode="hidden", anchor="base")
    assert calls[-1]["anchor"] == "base" and calls[-1]["seed"] == 1


def test_front_stage_writes_files_and_figure(tmp_path, tiny_base, monkeypatch):
    cfg, run = make_run(tmp_path, tiny_base)
    with pytest.raises(EmorlError, match="base model"):
        front_run(run, cfg, base=tiny_base, progress=False)
    res = evaluate_run(run, cfg, ["base", "uniform", "singles"], base=tiny_base, progress=False)
    out = front_run(run, cfg, base=tiny_base, progress=False)
    folder = run / "front"
    assert {"front.json", "hidden.json", "params.json", "front.png"} <= {p.name for p in folder.iterdir()}
    png = (folder / "front.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    saved = json.loads((folder / "front.json").read_text())
    assert saved["statements"] == out["statements"] and out["figure"] == "front/front.png"
    # the reference point is the base model's evaluated mean scores
    base = res["methods"]["base"]["summary"]
    assert out["reference"]["scores"] == pytest.approx({o: base[f"score/{o}"]["mean"] for o in ("short", "long")})
    hidden = json.loads((folder / "hidden.json").read_text())
    assert len(hidden["points"]) == 8 + 1 and sum(p["searched"] for p in hidden["points"]) == 1  # lattice + search
    assert len(json.loads((folder / "params.json").read_text())["points"]) == 8  # no params search: lattice only
    assert all(len(p["units"]["short"]) == 4 * 2 for p in hidden["points"])  # 4 prompts x 2 seeds
    # the machine and dtype that decoded each entry are recorded with its points and in front.json
    assert hidden["environment"]["dtype"] == "float32" and saved["environment"]["hidden"] == hidden["environment"]
    ref = [out["reference"]["scores"][o] for o in ("short", "long")]
    for entry in ("hidden", "params"):
        pts = np.array([[p["scores"]["short"], p["scores"]["long"]]
                        for p in json.loads((folder / f"{entry}.json").read_text())["points"]])
        m = out["modes"][entry]  # checked against naive references (the CIs: test_analyse_by_hand)
        assert m["hypervolume"] == pytest.approx(_hv2(pts, ref))
        assert len(m["front"]) == len({tuple(q) for q in _front(pts)})
        for name in ("uniform", "single:short", "single:long"):
            point = [res["methods"][name]["summary"][f"score/{o}"]["mean"] for o in ("short", "long")]
            assert out["one_policy"][name]["fronts"][entry]["verdict"] == _verdict(pts, point)
    assert any("hidden: hypervolume" in s for s in out["statements"])
    d = out["hypervolume_differences"]["hidden - params"]  # paired over the same units
    assert d["mean"] == pytest.approx(out["modes"]["hidden"]["hypervolume"] - out["modes"]["params"]["hypervolume"])
    # unchanged inputs: nothing is decoded again
    monkeypatch.setattr("emorl.front.run.score_lattice", lambda *a, **k: pytest.fail("decoded again"))
    again = front_run(run, cfg, base=tiny_base, progress=False, plot=False)
    assert again["modes"]["hidden"]["hypervolume"] == out["modes"]["hidden"]["hypervolume"]


def test_front_is_a_stage_of_emorl_run(tmp_path):
    from emorl.pipeline import make_plan, run_pipeline

    cfg = load_config("tiny", ["front.enabled=true", "front.step=0.5", "front.modes=[hidden]", "search.modes=[hidden]",
                               "eval.methods=[base, emorl, uniform]", "train.max_steps=1", "search.iterations=1",
                               "search.prompts=2", "search.reeval_top=2", "search.reeval_prompts=3",
                               "eval.prompts=3"])
    run = tmp_path / "run"
    seen = []
    run_pipeline(cfg, run, progress=False, after_stage=seen.append)
    assert seen == ["train", "baselines", "search", "evaluate", "front", "report"]
    out = json.loads((run / "front" / "front.json").read_text())
    assert (run / "front" / "front.png").exists() and set(out["modes"]) == {"hidden"}
    pts = json.loads((run / "front" / "hidden.json").read_text())["points"]
    assert len(pts) == 3 ** 3 - 1 and sum(p["searched"] for p in pts) == 1  # a 1-round search lands on the lattice
    assert set(out["one_policy"]) == {"uniform"}
    best = json.loads((run / "search" / "hidden" / "best.json").read_text())
    assert len(best["reeval"]["points"]) == 2 and "reeval_aggregate" in best
    assert {s.stage: s.status for s in make_plan(cfg, run).steps}["front"] == "done"
    cfg.front.step = 1.0
    assert {s.stage: s.status for s in make_plan(cfg, run).steps}["front"] == "run"


def test_linear_prediction_anchored_and_convex_by_hand():
    from emorl.front.linear import linear_prediction

    base = np.array([[0.2, 0.4]])  # one unit, two objectives
    singles = np.array([[[0.6, 0.4]], [[0.2, 0.8]]])  # adapter 1 moves objective 1 by +0.4, adapter 2 objective 2
    pts = np.array([[1.0, 1.0], [0.5, 0.0], [2.0, 1.0]])
    anchored = linear_prediction(pts, singles, base, convex=False)
    assert np.allclose(anchored[:, 0], [[0.6, 0.8], [0.4, 0.4], [1.0, 0.8]])
    convex = linear_prediction(pts, singles, base, convex=True)  # (w / sum w) . singles
    assert np.allclose(convex[:, 0], [[0.4, 0.6], [0.6, 0.4], [(2 * 0.6 + 0.2) / 3, (2 * 0.4 + 0.8) / 3]])


def test_linear_gaps_count_points_above_and_below():
    from emorl.front.linear import linear_gaps

    rng = np.random.default_rng(0)
    pred = rng.uniform(0.3, 0.7, size=(3, 200, 2))
    noise = rng.normal(0, 0.01, size=pred.shape)
    actual = pred + noise + np.array([0.1, -0.1, 0.0])[:, None, None]  # above, below, level
    g = linear_gaps(actual, pred, resamples=500)
    assert (g["above"], g["below"], g["unresolved"], g["points"]) == (1, 1, 1, 3)
    assert g["mean_gap"] == pytest.approx(0.0, abs=0.005)
    assert g["per_point"][0]["gap"] == pytest.approx(0.1, abs=0.005)


def test_sweep_points_and_dip():
    from emorl.front.linear import sweep_dip, sweep_points

    pts = sweep_points(3, (0, 2))
    assert pts.shape == (11, 3) and np.allclose(pts[:, 1], 0) and np.allclose(pts.sum(axis=1), 1)
    assert np.allclose(pts[:, 0], np.linspace(0, 1, 11))
    rng = np.random.default_rng(1)
    ends = np.linspace(0.6, 0.7, 11)
    flat = ends[:, None, None] + rng.normal(0, 0.01, size=(11, 100, 1))  # linear between the ends: no dip
    assert not sweep_dip(flat, resamples=500)["dip"]
    dipped = flat.copy()
    dipped[5] -= 0.2  # t = 0.5 falls below both ends
    d = sweep_dip(dipped, resamples=500)
    assert d["dip"] and d["lowest_interior"] == 5 and d["lower_end"] == 0
    assert d["interior_minus_lower_end"]["mean"] == pytest.approx(0.65 - 0.2 - 0.6, abs=0.01)


def test_front_on_a_subset_of_units_with_linear_prediction_and_sweep(tmp_path, tiny_base):
    cfg, run = make_run(tmp_path, tiny_base)
    evaluate_run(run, cfg, ["base", "uniform", "singles"], base=tiny_base, progress=False)
    cfg.front.prompts, cfg.front.seeds, cfg.front.sweep = 2, [1], ["short", "long"]
    out = front_run(run, cfg, base=tiny_base, progress=False, plot=False)
    assert out["prompts"] == 2 and out["seeds"] == [1] and out["units"] == 2
    hidden = json.loads((run / "front" / "hidden.json").read_text())
    assert all(len(p["units"]["short"]) == 2 for p in hidden["points"])
    # a one-hot anchored point is its adapter alone, decoded on the same units: the same per-unit scores
    one_hot = next(p for p in hidden["points"] if p["weights"] == {"short": 1.0, "long": 0.0})
    single = [json.loads(x) for x in (run / "eval" / "replies" / "single:short.jsonl").read_text().splitlines()]
    mine = [r["scores"]["short"] for r in single if r["seed"] == 1][:2]
    assert one_hot["units"]["short"] == pytest.approx(mine, abs=1e-6)
    # one-policy points are placed by their mean on the front's units, not on all of the evaluation's
    assert out["one_policy"]["single:short"]["scores"]["short"] == pytest.approx(np.mean(mine), abs=1e-6)
    for entry in ("hidden", "params"):
        g = out["linear"][entry]
        assert g["points"] == len(json.loads((run / "front" / f"{entry}.json").read_text())["points"])
        assert g["above"] + g["below"] + g["unresolved"] == g["points"]
    sweep = out["sweep"]
    assert sweep["pair"] == ["short", "long"] and set(sweep["pools"]) == {"hidden", "probs"}
    assert all(len(p["mean_reward"]) == 11 for p in sweep["pools"].values())
    # both pools share their ends (one adapter alone at t = 0 and t = 1)
    h, p = sweep["pools"]["hidden"]["mean_reward"], sweep["pools"]["probs"]["mean_reward"]
    assert h[0] == pytest.approx(p[0], abs=1e-6) and h[-1] == pytest.approx(p[-1], abs=1e-6)
    assert any("linear prediction" in s for s in out["statements"])
    assert any("edge sweep short/long, probs pool" in s for s in out["statements"])
    cfg.front.seeds = [7]
    with pytest.raises(EmorlError, match="front.seeds"):
        from emorl.config import validate

        validate(cfg)

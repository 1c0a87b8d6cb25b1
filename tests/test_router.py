"""The per-prompt weight router: lattice, fit (knn / ridge, cross-validated choice), fallback, storage refusals,
the paired bootstrap, and a tiny end-to-end run (``emorl route``, ``--weights auto``, ``emorl-routed``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emorl.router.compare import paired_bootstrap, summarise, weights_figure
from emorl.router.data import (
    DATA_VERSION,
    Block,
    RouterData,
    box_lattice,
    load_data,
    save_data,
    search_best,
    search_block,
    simplex_lattice,
)
from emorl.router.fit import fit_router
from emorl.router.store import ROUTER_VERSION, load_router, save_router
from emorl.utils import EmorlError

NAMES = ["reflection", "empathy", "fluency"]
OPT = {0: np.array([0.75, 0.25, 0.0]), 1: np.array([0.0, 0.25, 0.75])}  # best weights of each prompt group
EQUAL = np.full(3, 1 / 3)


def centres(d: int = 16) -> np.ndarray:
    c = np.zeros((3, d))
    c[0, 0] = c[1, 1] = c[2, 2] = 1.0  # group 0, group 1, and a direction no training prompt has
    return c


def prompts_of(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    e = centres()[group] + rng.normal(0, 0.05, (len(group), 16))
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def true_score(w: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(B, P) reward of each point for each prompt: 1 - squared distance to the group's optimum."""
    opt = np.stack([OPT[g] for g in group])
    return 1.0 - ((w[None, :, :] - opt[:, None, :]) ** 2).sum(-1)


def synthetic(n: int = 40, seed: int = 0) -> tuple[RouterData, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = np.arange(n) % 2
    emb = prompts_of(group, rng)
    pts = simplex_lattice(3, 0.25)
    agg = true_score(pts, group) + rng.normal(0, 0.005, (n, len(pts)))  # (B, P)
    scores = np.repeat(agg.T[:, None, :, None], 3, axis=3)  # every objective = the aggregate
    data = RouterData(NAMES, NAMES, [Block([f"p{i}" for i in range(n)], pts, scores)])
    return data, emb, group


def test_box_lattice_covers_the_anchored_box() -> None:
    pts = box_lattice(2, 0.5, 2.0)
    assert pts.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    assert box_lattice(3, 0.5, 1.0).shape == (27, 3) and box_lattice(3, 0.25, 2.0).max() == 2.0
    with pytest.raises(EmorlError, match="1/step must be a whole number"):
        box_lattice(3, 0.3, 1.0)


def test_search_best_is_the_anchored_point_as_found(tmp_path: Path) -> None:
    best = tmp_path / "search" / "hidden" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"weight_vector": [0.5, 1.5, 0.0], "anchor": "base"}))
    assert search_best(tmp_path, "hidden").tolist() == [0.5, 1.5, 0.0]  # not normalised: the scale is strength
    best.write_text(json.dumps({"weight_vector": [0.5, 1.5, 0.0], "anchor": "none"}))
    assert search_best(tmp_path, "hidden") is None  # a convex search is not the router's rule


def test_lattice_points_are_the_simplex_grid() -> None:
    assert simplex_lattice(2, 0.5).tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    pts = simplex_lattice(3, 0.25)
    assert pts.shape == (15, 3) and np.allclose(pts.sum(1), 1) and len({tuple(p) for p in pts}) == 15
    with pytest.raises(EmorlError, match="1/step must be a whole number"):
        simplex_lattice(3, 0.3)


@pytest.mark.parametrize("method", ["knn", "ridge"])
def test_router_recovers_group_weights_and_beats_the_global_vector(method: str) -> None:
    data, emb, _ = synthetic()
    w_mean = np.full(3, 1 / 3)
    router = fit_router(data, [emb], w_mean, method=method, k=5, seed=0, percentile=100)  # no fallback here
    rng = np.random.default_rng(7)
    group = np.arange(30) % 2
    got, far = router.predict(prompts_of(group, rng))
    assert not far.any()
    for g in (0, 1):  # within one lattice step of the group's optimum (here exactly on it)
        assert np.abs(got[group == g] - OPT[g]).max() <= 0.25 + 1e-9
        assert np.allclose(got[group == g], OPT[g])
    # the global vector: the best lattice point on average, a compromise between the groups
    assert np.allclose(router.global_weights, [0.25, 0.25, 0.5]) or np.allclose(router.global_weights,
                                                                                 [0.5, 0.25, 0.25])
    mine = np.diag(true_score(got, group)[:, np.arange(30)]).mean()
    glob = true_score(router.global_weights[None], group).mean()
    assert mine == pytest.approx(1.0)
    assert glob == pytest.approx(1 - 0.3125)  # hand-computed: (0.5² + 0² + 0.25²) or the mirror, for both groups
    assert mine - glob > 0.3


def test_auto_choice_cross_validation_and_determinism() -> None:
    data, emb, _ = synthetic()
    a = fit_router(data, [emb], EQUAL, method="auto", seed=3)
    b = fit_router(data, [emb], EQUAL, method="auto", seed=3)
    assert a.method == b.method and a.info["cv"] == b.info["cv"] and a.threshold == b.threshold
    assert np.array_equal(a.best, b.best) and np.array_equal(a.global_weights, b.global_weights)
    cv = a.info["cv"]
    assert cv["knn"] == pytest.approx(1.0, abs=0.01) and cv["ridge"] == pytest.approx(1.0, abs=0.01)
    assert cv["global"] <= 1 - 0.3125 + 0.01  # a held-out fold can only do as well as the best compromise
    assert cv[a.method] == max(cv["knn"], cv["ridge"])
    with pytest.raises(EmorlError, match="route.method"):
        fit_router(data, [emb], EQUAL, method="forest")


def test_auto_chooses_the_global_weights_when_per_prompt_choices_lose_held_out() -> None:
    """Every prompt has the same optimum and the per-prompt scores are mostly noise: a per-prompt choice fits the
    noise, one global point does better held out, so auto routes every prompt to the global weights."""
    rng = np.random.default_rng(0)
    n, pts = 40, simplex_lattice(3, 0.25)
    emb = prompts_of(np.arange(n) % 2, rng)
    agg = true_score(pts, np.zeros(n, int)) + rng.normal(0, 0.3, (n, len(pts)))
    data = RouterData(NAMES, NAMES, [Block([f"p{i}" for i in range(n)], pts, np.repeat(agg.T[:, None, :, None], 3, 3))])
    given = np.array([0.5, 0.25, 0.25])
    r = fit_router(data, [emb], EQUAL, method="auto", seed=0, global_weights=given)
    cv = r.info["cv"]
    assert cv["global"] > max(cv["knn"], cv["ridge"]) and r.method == "global"
    w, _ = r.predict(prompts_of(np.arange(6) % 2, rng))
    assert np.array_equal(w, np.repeat(given[None], 6, axis=0))
    assert fit_router(data, [emb], EQUAL, method="ridge", seed=0).method == "ridge"  # asked for: kept


def test_a_far_prompt_falls_back_to_the_global_weights() -> None:
    data, emb, _ = synthetic()
    given = np.array([0.2, 0.3, 0.5])
    router = fit_router(data, [emb], EQUAL, method="knn", global_weights=given)
    nn = 1 - np.sort(emb @ emb.T - 2 * np.eye(len(emb)), axis=1)[:, -1]
    assert router.threshold == pytest.approx(np.percentile(nn, 95))
    far_prompt = centres()[2:3]  # orthogonal to every training prompt: distance 1
    w, far = router.predict(np.vstack([far_prompt, emb[:1]]))
    assert far.tolist() == [True, False]
    assert np.allclose(w[0], given) and np.allclose(w[1], OPT[0])


def test_store_roundtrip_and_refusals(tmp_path: Path) -> None:
    data, emb, _ = synthetic()
    router = fit_router(data, [emb], EQUAL, method="ridge")
    ids = {n: f"id-{n}" for n in NAMES}
    save_router(tmp_path, router, adapters=ids, settings={"x": 1}, prompts=data.lattice.prompts)
    assert not list(tmp_path.glob("*.pkl"))
    back, meta = load_router(tmp_path, ids)
    w1, _ = router.predict(emb[:5])
    w2, _ = back.predict(emb[:5])
    assert np.array_equal(w1, w2) and meta["method"] == "ridge"
    with pytest.raises(EmorlError, match=r"fitted on other adapters \(differ: \['empathy'\]"):
        load_router(tmp_path, ids | {"empathy": "other"})
    meta_path = tmp_path / "router.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"version": ROUTER_VERSION + 1}))
    with pytest.raises(EmorlError, match=f"router file version {ROUTER_VERSION + 1} is not one this emorl reads"):
        load_router(tmp_path, ids)


def test_data_roundtrip_and_search_rows(tmp_path: Path) -> None:
    data, _, _ = synthetic(n=4)
    save_data(tmp_path, RouterData(data.names, data.objectives, data.blocks, {"version": DATA_VERSION,
                                                                                "split": "train"}))
    back = load_data(tmp_path)
    assert back.lattice.prompts == data.lattice.prompts and np.allclose(back.lattice.scores, data.lattice.scores)
    log = tmp_path / "search" / "hidden" / "points.jsonl"
    log.parent.mkdir(parents=True)
    rows = [{"kind": "header", "names": NAMES, "prompts": ["a", "b"], "anchor": "base"},
            {"weights": [2, 0, 0], "per_prompt": {o: [0.1, 0.9] for o in NAMES}},
            {"weights": [0, 1, 1]}]  # a row without per-prompt scores is skipped
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    blk = search_block(tmp_path, "hidden", NAMES, NAMES)
    assert blk.prompts == ["a", "b"] and blk.points.tolist() == [[2.0, 0.0, 0.0]]  # anchored: the scale is kept
    assert blk.scores.shape == (1, 1, 2, 3) and np.allclose(blk.aggregate(EQUAL), [[0.1], [0.9]])


def test_paired_bootstrap_pins_a_constant_difference() -> None:
    rng = np.random.default_rng(0)
    g = rng.random(50)
    out = paired_bootstrap({"router": g + 0.1, "global": g, "oracle": g + 0.3}, reps=500)
    d = out["router-global"]
    assert d["mean"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)
    assert out["gap_closed"]["mean"] == pytest.approx(1 / 3) and out["gap_closed"]["lo"] == pytest.approx(1 / 3)
    assert out["global"]["lo"] < g.mean() < out["global"]["hi"]


def test_summarise_oracle_takes_each_prompts_best_point() -> None:
    # rows: router, global, uniform, lattice a, lattice b; 1 seed, 2 prompts, 1 objective
    t = np.array([[0.5, 0.5], [0.4, 0.4], [0.3, 0.3], [0.9, 0.1], [0.2, 0.8]], dtype=float)[:, None, :, None]
    out = summarise(t, ["o"], np.ones(1), reps=100)
    assert out["mean_reward"]["oracle"]["mean"] == pytest.approx(0.85)
    assert out["mean_reward"]["router"]["mean"] == pytest.approx(0.5)
    assert out["mean_reward"]["gap_closed"]["mean"] == pytest.approx(0.1 / 0.45)


def test_weights_figure_is_a_png(tmp_path: Path) -> None:
    data, emb, _ = synthetic(n=12)
    w = simplex_lattice(3, 0.25)[:12]
    weights_figure(w, emb, NAMES, tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------- end to end (tiny)

OBJECTIVES = {"short": {"type": "length", "target": 3.0}, "long": {"type": "length", "target": 30.0}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emorl.config import load_config
    from emorl.models import AdapterInfo, add_adapters, load_base, save_adapter

    run = tmp_path_factory.mktemp("route") / "run"
    cfg = load_config("tiny", ["route.prompts=6", "route.step=0.5", "route.k=2", "route.folds=3",
                               "eval.prompts=4", "eval.methods=[emorl-routed]"])
    cfg.objectives = dict(OBJECTIVES)
    cfg.save(run / "config.yaml")
    base = load_base(cfg.model)
    model = add_adapters(base, list(OBJECTIVES), cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    for name, spec in OBJECTIVES.items():
        save_adapter(model, name, run / "adapters" / name,
                     AdapterInfo(objective=name, rewards={name: spec}, base=base.identity, steps=1))
    return run


def test_tiny_end_to_end_route_generate_auto_and_evaluate(tiny_run: Path, tmp_path: Path) -> None:
    from emorl.cli import main
    from emorl.config import load_run_config
    from emorl.evaluate import evaluate_run
    from emorl.router.compare import compare_run
    from emorl.router.run import fit_run

    cfg = load_run_config(tiny_run)
    router, meta = fit_run(tiny_run, cfg)
    assert meta["fit"]["data"] == {"points": 9, "prompts": 6, "seeds": 1, "decode_s": meta["fit"]["data"]["decode_s"],
                                   "blocks": ["lattice"]}  # {0, w_max/2, w_max}^2
    assert (tiny_run / "router" / "data.safetensors").exists() and (tiny_run / "router" / "router.json").exists()
    again, _ = fit_run(tiny_run, cfg)  # data reused, same fit
    assert np.array_equal(again.best, router.best) and again.method == router.method

    out = tmp_path / "auto.jsonl"
    assert main(["generate", "--run", str(tiny_run), "--weights", "auto", "--prompt", "I lost my job today.",
                 "--prompt", "My cat is sick.", "--max-new-tokens", "4", "--output", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 2 and all(set(r["weights"]) == {"short", "long"} for r in recs)
    box = box_lattice(2, 0.5, cfg.search.w_max).tolist()  # anchored weights: points of the box, or means of them
    assert all(r["router"] in ("routed", "fallback") and max(r["weights"].values()) <= cfg.search.w_max for r in recs)
    assert all(list(r["weights"].values()) in box for r in recs if r["router"] == "fallback")

    res = evaluate_run(tiny_run, cfg, ["emorl-routed"], progress=False)
    assert res["methods"]["emorl-routed"]["kind"] == "routed"
    replies = [json.loads(x) for x in (tiny_run / "eval" / "replies" / "emorl-routed.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in replies]
    assert len(replies) == 4
    from emorl.decoding import decode_routed, generation_kwargs
    from emorl.ensemble import EnsembleModel
    from emorl.router import route

    ens = EnsembleModel.from_run(tiny_run)
    w, _, _ = route(tiny_run, ens, prompts)  # the evaluation decodes exactly what the router picks
    texts, _, _ = decode_routed(ens, prompts, w, seed=cfg.eval.seeds[0], **generation_kwargs(cfg.eval.generation))
    assert texts == [r["reply"] for r in replies]

    rep = compare_run(tiny_run, cfg, prompts=["I lost my job today.", "My cat is sick.", "I feel alone."], seeds=[0],
                      reps=50, base=ens.base)
    r = rep["results"]["mean_reward"]
    # no search in this run: the global vector is the lattice point best on average over the training prompts
    assert rep["global_weights"] == router.global_weights.tolist() and rep["global_source"] != "search"
    assert router.global_weights.tolist() in box_lattice(2, 0.5, cfg.search.w_max).tolist()
    assert r["oracle"]["mean"] >= max(r["global"]["mean"], r["uniform"]["mean"]) - 1e-12
    assert rep["pairs"] == 3 and len(rep["weights"]) == 3 and (tiny_run / "router" / "compare.json").exists()

    # the CLI: refit (data reused) and compare on the run's test split (eval.prompts=4, one seed)
    assert main(["route", "--run", str(tiny_run), "--compare"]) == 0
    rep = json.loads((tiny_run / "router" / "compare.json").read_text())
    assert rep["split"] == "test" and rep["prompts"] == 4 and set(rep["results"]) == {"mean_reward", *OBJECTIVES}

    # a router fitted on other adapters is refused before decoding
    mp = tiny_run / "router" / "router.json"
    m = json.loads(mp.read_text())
    mp.write_text(json.dumps(m | {"adapters": {"short": "0" * 16, "long": m["adapters"]["long"]}}))
    with pytest.raises(EmorlError, match="fitted on other adapters"):
        main(["--verbose", "generate", "--run", str(tiny_run), "--weights", "auto", "--prompt", "Hi there."])
    mp.write_text(json.dumps(m))


def test_tiny_router_on_the_anchored_rule_falls_back_to_the_anchored_emorl_weights(tiny_run: Path,
                                                                                  tmp_path: Path) -> None:
    """With an anchored search's best point (not summing to 1), the router's data holds the whole box lattice plus
    that point, decoded by the anchored rule (equal to decoding the points with anchor="base"); the global weights
    (the fallback) are that point as found; a far prompt gets them; compare reports router − anchored global."""
    import shutil

    from emorl.decoding import generation_kwargs
    from emorl.ensemble import EnsembleModel
    from emorl.rewards import build_rewards, score
    from emorl.router.compare import compare_run
    from emorl.router.run import fit_run
    from emorl.search.runner import load_run_config

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("router", "eval"))
    emorl_w = [0.25, 1.0]  # off the lattice, not summing to 1
    (run / "search" / "hidden").mkdir(parents=True)
    (run / "search" / "hidden" / "best.json").write_text(json.dumps({"weight_vector": emorl_w, "anchor": "base"}))
    cfg = load_run_config(run)
    router, meta = fit_run(run, cfg)
    data = load_data(run / "router")
    box = box_lattice(2, 0.5, cfg.search.w_max)
    assert data.lattice.points.tolist() == [*box.tolist(), emorl_w] and data.meta["anchor"] == "base"
    assert router.global_weights.tolist() == emorl_w and meta["fit"]["global_source"] == "search"
    w, far = router.predict(-router.emb[:1])  # no training prompt points that way
    assert far.tolist() == [True] and w.tolist() == [emorl_w]
    # the stored scores are those of the anchored decode of every point
    ens = EnsembleModel.from_run(run)
    rewards = build_rewards(cfg.objectives, ens.base)
    res = ens.generate(data.lattice.prompts, data.lattice.points, mode="hidden", seed=cfg.route.seeds[0],
                       anchor="base", **generation_kwargs(cfg.eval.generation))
    flat = [t for g in res.all_texts for t in g]
    for oi, (o, rw) in enumerate(rewards.items()):
        want = score(rw, data.lattice.prompts * len(data.lattice.points), flat).reshape(len(data.lattice.points), -1)
        np.testing.assert_allclose(data.lattice.scores[:, 0, :, oi], want, atol=1e-6, err_msg=o)
    rep = compare_run(run, cfg, prompts=["I lost my job today.", "My cat is sick.", "I feel alone."], seeds=[0, 1],
                      reps=50, base=ens.base, figure=False)
    assert rep["rule"] == "base-anchored" and rep["global_weights"] == emorl_w and rep["global_source"] == "search"
    d = rep["results"]["mean_reward"]["router-global"]
    assert d["lo"] <= d["mean"] <= d["hi"] and rep["pairs"] == 6


def test_route_stage_in_the_plan_only_when_enabled(tmp_path: Path) -> None:
    from emorl.config import load_config
    from emorl.pipeline import describe_plan, make_plan

    off = make_plan(load_config("tiny"), tmp_path / "run")
    assert not off.stage("route")
    on = make_plan(load_config("tiny", ["route.enabled=true"]), tmp_path / "run")
    assert [(s.name, s.status) for s in on.stage("route")] == [("router", "run")]
    assert "3b. fit router" in describe_plan(on, est=False)

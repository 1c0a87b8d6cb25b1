"""The search through the real decoder and rewards on the tiny preset: files and plots written, the batched
objective equals point-by-point decoding, resume decodes nothing, foreign adapters refused, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emorl.config import load_config
from emorl.search import expected_evaluations
from emorl.search.objective import EnsembleObjective
from emorl.search.runner import search_run
from emorl.utils import EmorlError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run folder: config.yaml and three random (non-zero) LoRA adapters."""
    from emorl.models import load_base, save_random_adapters

    run = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", ["search.iterations=2", "search.prompts=3", "search.generation.max_new_tokens=6",
                               "search.batch_points=16", "search.generation.do_sample=false"])  # greedy: dedup
    cfg.save(run / "config.yaml")
    save_random_adapters(load_base(cfg.model), cfg.trained_objectives(), cfg.lora, run / "adapters", std=0.5)
    return run


@pytest.fixture(scope="module")
def ensemble(run_dir):
    from emorl.ensemble import EnsembleModel

    return EnsembleModel.from_run(run_dir)


class Counting:
    """Wraps an ensemble and counts the weight points it is asked to decode."""

    def __init__(self, ens):
        self.ens, self.names, self.base, self.points = ens, ens.names, ens.base, []

    def generate(self, prompts, weights, **kw):
        self.points.extend(map(tuple, np.atleast_2d(weights).tolist()))
        return self.ens.generate(prompts, weights, **kw)


def test_end_to_end_writes_log_best_and_plots(run_dir, ensemble):
    counting = Counting(ensemble)
    res, out = search_run(run_dir, mode="hidden-convex", progress=False, ensemble=counting)
    assert out == run_dir / "search" / "hidden-convex"
    assert {"points.jsonl", "best.json", "history.png", "landscape.png", "tradeoff.png", "weights.png"} <= \
        {p.name for p in out.iterdir()}
    lines = (out / "points.jsonl").read_text().splitlines()
    header, points = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["names"] == ["reflection", "empathy", "fluency"] and len(header["adapters"]) == 3
    assert len(points) == res.n_unique == expected_evaluations(3, 2)
    assert {"weights", "aggregate", "scores", "round", "time"} <= set(points[0])
    zero = [p for p in points if not any(p["weights"])]  # no direction: never a candidate, nothing decoded
    assert len(zero) == 1 and zero[0]["aggregate"] is None and zero[0]["source"] == "degenerate"  # None: -inf
    assert all(set(p["scores"]) == {"reflection", "empathy", "fluency"} for p in points if any(p["weights"]))
    # per-prompt scores in the header's prompt order (3 search prompts)
    assert len(header["prompt_list"]) == 3 and header["seeds"] == [0]
    assert all(len(p["per_prompt"][o]) == 3 for p in points if p["source"] == "decoded" for o in p["scores"])
    one = next(p for p in points if p["source"] == "decoded")
    assert np.mean(one["per_prompt"]["empathy"]) == pytest.approx(one["scores"]["empathy"], abs=1e-5)
    # convex hidden mixing: one decode per direction, never the zero point; then the top 3 directions re-scored
    # on the whole validation split (more prompts than the search's 3)
    assert len(counting.points) == res.n_decoded + 3 and res.n_decoded < res.n_unique
    assert (0.0, 0.0, 0.0) not in counting.points
    best = json.loads((out / "best.json").read_text())
    assert best["search_aggregate"] == pytest.approx(res.aggregate)
    assert (best["mode"], best["anchor"], best["search_key"]) == ("hidden", "none", "hidden-convex")
    assert res.aggregate == max(p["aggregate"] for p in points if p["aggregate"] is not None)
    re = best["reeval"]
    assert len(re["points"]) == 3 and re["prompts"] > 3 and re["seeds"] == [1000]
    chosen = re["points"][re["chosen"]]
    assert chosen["aggregate"] == max(p["aggregate"] for p in re["points"])
    assert best["weight_vector"] == list(chosen["weights"].values())
    assert best["reeval_aggregate"] == chosen["aggregate"] and best["aggregate"] == chosen["search_aggregate"]
    # resuming a finished search decodes nothing and returns the same point
    again = Counting(ensemble)
    res2, _ = search_run(run_dir, mode="hidden-convex", progress=False, ensemble=again, resume=True, plots=False)
    assert again.points == [] and res2.weights == res.weights
    # anchored (the default rule): the scale counts, so every point is decoded, w = 0 (the base) too
    anchored = Counting(ensemble)
    res3, out3 = search_run(run_dir, mode="hidden", progress=False, ensemble=anchored, plots=False)
    assert out3 == run_dir / "search" / "hidden" and res3.n_unique == res3.n_decoded
    assert len(anchored.points) == res3.n_decoded + 3  # + the re-evaluation of the top 3
    assert (0.0, 0.0, 0.0) in anchored.points
    # re-scoring a logged point on the search's prompts and seed reproduces its logged aggregate
    from emorl.data import load_splits
    from emorl.rewards import build_rewards
    from emorl.search.objective import build_objective

    cfg = load_config(str(run_dir / "config.yaml"))
    prompts = [r.prompt for r in load_splits(cfg.data).validation[: cfg.search.prompts]]
    obj = build_objective(ensemble, prompts, build_rewards(cfg.objectives, ensemble.base), "hidden", cfg.search)
    logged = [json.loads(x) for x in (out3 / "points.jsonl").read_text().splitlines()[1:]][:5]
    again_scores = obj(np.array([r["weights"] for r in logged]))
    assert [s.aggregate for s in again_scores] == pytest.approx([r["aggregate"] for r in logged], abs=1e-6)


def test_batched_objective_equals_point_by_point(run_dir, ensemble):
    """Scores of points decoded together equal decoding each point alone and scoring it with plain code."""
    from emorl.rewards import build_rewards, score

    cfg = load_config(str(run_dir / "config.yaml"))
    rewards = build_rewards(cfg.objectives, ensemble.base)
    prompts = ["I lost my job today and I feel numb.", "My sister stopped talking to me.", "I can't sleep."]
    obj = EnsembleObjective(ensemble, prompts, rewards, mode="logits", generation=cfg.search.generation)
    pts = np.array([[1.0, 0.5, 0.0], [0.25, 0.25, 1.0], [0.0, 0.0, 0.0], [0.5, 1.0, 0.5]])
    got = obj(pts)
    for p, s in zip(pts, got, strict=True):  # anchored (default): w = 0 decodes the base
        replies = ensemble.generate(prompts, p, mode="logits", max_new_tokens=6, do_sample=False).texts
        ref = {n: float(np.mean(score(r, prompts, replies))) for n, r in rewards.items()}
        assert s.scores == pytest.approx(ref, abs=1e-6)
        assert s.aggregate == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
    weighted = EnsembleObjective(ensemble, prompts, rewards, mode="logits", generation=cfg.search.generation,
                                 objective_weights=[2, 1, 1])(pts[:1])[0]
    sc = weighted.scores
    assert weighted.aggregate == pytest.approx((2 * sc["reflection"] + sc["empathy"] + sc["fluency"]) / 4)


def test_params_mode_decodes_base_at_zero_and_cli(run_dir, capsys):
    """Task arithmetic (params, anchored): every point is decoded, w = 0 included, and the w = 0 point's scores are
    those of the evaluated base for that seed (one decoding path). Sampled, so the seed matters."""
    from emorl.cli import main
    from emorl.decoding import Decoder
    from emorl.methods import MethodSpec
    from emorl.rewards import build_rewards, score

    rc = main(["search", "--run", str(run_dir), "--mode", "params", "--iterations", "1", "--no-plots",
               "--no-progress", "search.generation.do_sample=true", "search.seeds=[3]", "search.reeval_top=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best weights" in out and "aggregate score" in out
    chosen = json.loads((run_dir / "search" / "params" / "best.json").read_text())
    for n, w in chosen["weights"].items():  # the CLI reports the point best.json holds (the one evaluated)
        assert f"{n:<16} {w:.5f}" in out
    lines = (run_dir / "search" / "params" / "points.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines[1:]]
    assert len(rows) == 27 and all(r["source"] == "decoded" for r in rows)  # params: no direction reuse
    zero = next(r for r in rows if not any(r["weights"]))
    cfg = load_config(str(run_dir / "config.yaml"), ["search.generation.do_sample=true"])
    from emorl.data import load_splits
    from emorl.models import load_base

    base = load_base(cfg.model)
    prompts = json.loads(lines[0])["prompt_list"]
    assert prompts == [r.prompt for r in load_splits(cfg.data).validation][: len(prompts)]
    dec = Decoder(base, cfg.search.generation, {"reflection": run_dir / "adapters" / "reflection"})
    replies, _ = dec.decode(MethodSpec("base", "base"), prompts, 3)
    rewards = build_rewards(cfg.objectives, base)
    ref = {n: float(np.mean(score(r, prompts, replies))) for n, r in rewards.items()}
    assert zero["scores"] == pytest.approx(ref, abs=1e-6)
    # an existing log is not overwritten without --resume / --fresh
    assert main(["search", "--run", str(run_dir), "--mode", "params", "--iterations", "1", "--no-plots",
                 "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_against_other_adapters_refused(run_dir, tmp_path):
    import shutil

    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    f = other / "adapters" / "empathy" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(f))
    k = next(iter(sd))
    sd[k] = sd[k] + 1.0
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(EmorlError, match="other adapters"):
        search_run(other, mode="hidden", progress=False, resume=True)


def test_bad_inputs_fail_before_loading(run_dir, tmp_path):
    cfg = load_config(str(run_dir / "config.yaml"))
    with pytest.raises(EmorlError, match="mode"):
        search_run(run_dir, cfg, mode="average")
    cfg.search.objective_weights = [1.0, 2.0]
    with pytest.raises(EmorlError, match="objective_weights: 2 weights given for 3 objectives"):
        search_run(run_dir, cfg, mode="hidden")
    with pytest.raises(EmorlError, match="config.yaml does not exist"):
        search_run(tmp_path, mode="hidden")
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(EmorlError, match="no trained adapter"):
        search_run(tmp_path, mode="hidden")


def test_sampled_search_decodes_directions(run_dir, ensemble):
    """A convex mix decodes w / sum(w) with the same random numbers for every point, so w and c*w score the same
    (what lets the search deduplicate directions when it samples); anchored, they differ."""
    from emorl.config import GenerationConfig
    from emorl.rewards import build_rewards

    rewards = build_rewards(load_config(str(run_dir / "config.yaml")).objectives, ensemble.base)
    obj = EnsembleObjective(ensemble, ["I lost my job.", "My cat is sick."], rewards, mode="hidden",
                            generation=GenerationConfig(do_sample=True, max_new_tokens=6), seed=1, anchor="none")
    pts = np.array([[0.2, 0.5, 0.3], [0.4, 1.0, 0.6], [0.9, 0.05, 0.05]])
    a, b, c = obj(pts)
    assert obj.scale_invariant
    assert (a.aggregate, a.scores) == (b.aggregate, b.scores)
    assert (a.aggregate, a.scores) != (c.aggregate, c.scores)
    anchored = EnsembleObjective(ensemble, ["I lost my job.", "My cat is sick."], rewards, mode="hidden",
                                 generation=GenerationConfig(do_sample=True, max_new_tokens=6), seed=1)
    a2, b2, _ = anchored(pts)
    assert not anchored.scale_invariant
    # sum(w) = 1: anchored equals convex (the same replies; their reward scores agree up to float rounding, as the
    # sentence encoder embeds them in batches of another composition)
    assert a2.scores == pytest.approx(a.scores, abs=1e-6)
    assert b2.scores != b.scores


def test_reevaluation_picks_the_rescored_winner(run_dir):
    """An analytic objective whose search scores carry injected noise: a lucky bonus makes (1, 0, 0) the search's
    winner; the re-evaluation (more prompts, no noise) must choose the best of the top points by the true score."""
    from emorl.search.evaluator import Score

    target = np.array([0.5, 0.5, 0.5])
    calls = []

    def true(w):
        return -float(((w - target) ** 2).sum())

    def factory(mode, names, prompts, seeds=None):
        noisy = len(prompts) == 3  # the search decodes 3 prompts; the re-evaluation the whole validation split
        calls.append((len(prompts), seeds))

        def objective(points):
            return [Score(true(p) + (1.0 if noisy and tuple(p) == (1.0, 0.0, 0.0) else 0.0)) for p in points]
        return objective

    res, out = search_run(run_dir, mode="params", progress=False, plots=False, fresh=True, objective=factory)
    assert res.weights == [1.0, 0.0, 0.0] and res.aggregate == pytest.approx(0.25)  # the noise won the search
    best = json.loads((out / "best.json").read_text())
    re = best["reeval"]
    cands = [np.array(list(p["weights"].values())) for p in re["points"]]
    assert [p["search_aggregate"] for p in re["points"]] == sorted((p["search_aggregate"] for p in re["points"]),
                                                                   reverse=True)
    assert list(cands[0]) == [1.0, 0.0, 0.0] and re["points"][0]["aggregate"] == pytest.approx(-0.75)
    want = max(range(len(cands)), key=lambda i: true(cands[i]))
    assert re["chosen"] == want != 0
    assert best["weight_vector"] == list(cands[want]) and best["reeval_aggregate"] == pytest.approx(true(cands[want]))
    assert best["search_aggregate"] == pytest.approx(0.25)
    assert calls[-1][0] > 3 and calls[-1][1] == [1000]  # greedy: the first re-evaluation seed


def test_generation_mismatch_is_warned_naming_both(caplog):
    from emorl.search.runner import warn_generation_mismatch

    cfg = load_config("tiny")
    assert not warn_generation_mismatch(cfg)  # the preset decodes search and evaluation alike
    cfg.search.generation.do_sample = False
    with caplog.at_level("WARNING", logger="emorl.search.runner"):
        assert warn_generation_mismatch(cfg)
    assert "search.generation" in caplog.text and "eval.generation" in caplog.text
    assert "do_sample: search False vs eval True" in caplog.text


def test_the_runs_own_search_method_writes_where_the_evaluation_reads(run_dir, tmp_path):
    """search.method=grid is the run's search: its best.json is RUN/search/<mode>/best.json (the evaluation reads
    that); a grid search beside a hierarchical run's own goes to a subfolder. (A grid run used to write only
    RUN/search/<mode>/grid/, and `emorl run` then failed at evaluate with "best.json is missing".)"""
    from emorl.search.evaluator import Score

    def factory(mode, names, prompts, seeds=None):
        return lambda points: [Score(-float(((np.asarray(p) - 0.5) ** 2).sum())) for p in points]

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapters").symlink_to(run_dir / "adapters")
    cfg = load_config(str(run_dir / "config.yaml"), ["search.method=grid"])
    cfg.save(run / "config.yaml")
    _, out = search_run(run, mode="params", progress=False, plots=False, objective=factory)
    assert out == run / "search" / "params" and (out / "best.json").exists()
    _, out = search_run(run_dir, mode="params", method="grid", progress=False, plots=False, fresh=True,
                        objective=factory)
    assert out == run_dir / "search" / "params" / "grid" and (out / "best.json").exists()

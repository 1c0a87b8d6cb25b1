"""Metrics pinned on hand-computed examples; every method decoded by one engine (checked against plain
transformers generation); method resolution errors; evaluation reuse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from emorl.config import GenerationConfig, LoraConfig, ModelConfig, load_config
from emorl.decoding import Decoder, plain_generation_config
from emorl.evaluate import distinct_n, diversity_reference, evaluate_run, mean_std, reply_metrics, summarise
from emorl.methods import MethodSpec, eval_prompts, resolve_methods, training_cost
from emorl.models import AdapterInfo, add_adapters, load_base, save_adapter
from emorl.utils import EmorlError, atomic_write_json

# ------------------------------------------------------------------------------------------- metrics


def test_distinct2_counts_bigrams_over_all_replies():
    # bigrams: "a b a b" -> (a,b) (b,a) (a,b); "a b c" -> (a,b) (b,c); "x" -> none. 3 distinct of 5.
    assert distinct_n(["a b a b", "a b c", "x"], 2) == pytest.approx(3 / 5)
    # the same reply twice halves it: corpus level, not per reply
    assert distinct_n(["I hear you", "I hear you"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["one two three"], 1) == 1.0
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["", "single"], 2) == 0.0


def test_diversity_reference_divides_by_words():
    # "a b a b": 2 distinct bigrams / 4 words; "a b c": 2 / 3; "": 0 -> mean of the three
    assert diversity_reference(["a b a b", "a b c", ""]) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    # n distinct words: (n - 1) / n, never 1
    assert diversity_reference(["I am so sorry"]) == pytest.approx(3 / 4)
    assert diversity_reference(["hello"]) == 0.0
    assert diversity_reference([]) == 0.0
    # case and punctuation are kept, as the reference's whitespace split does
    assert diversity_reference(["Yes yes yes."]) == pytest.approx(2 / 3)


def test_mean_std_is_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert mean_std([0.42]) == (0.42, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_reply_metrics_and_summary():
    scores = {"a": np.array([0.2, 0.4]), "b": np.array([1.0, 0.0])}
    m = reply_metrics(["p", "q"], ["x y z", "x y"], scores, [4, 3])
    assert m["score/a"] == pytest.approx(0.3) and m["score/b"] == pytest.approx(0.5)
    assert m["mean_reward"] == pytest.approx(0.4)
    assert m["diversity2"] == pytest.approx(2 / 3)  # (x,y) (y,z) (x,y)
    assert m["diversity2_ref"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["length_tokens"] == 3.5 and m["length_words"] == 2.5
    s = summarise([{"mean_reward": 0.4}, {"mean_reward": 0.6}])
    assert s["mean_reward"]["mean"] == pytest.approx(0.5)
    assert s["mean_reward"]["std"] == pytest.approx(math.sqrt(0.02)) and s["mean_reward"]["n"] == 2
    with pytest.raises(ValueError):
        reply_metrics(["p"], ["x", "y"], {}, [1, 2])


# ------------------------------------------------------------------------------------------- decoding

PROMPTS = ["I lost my job today.", "My dog died and I can't stop crying.", "I feel alone."]


@pytest.fixture
def lively_base():
    """A tiny base with larger random weights, so greedy replies are real tokens rather than one special token."""
    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None, seed=3))
    g = torch.Generator().manual_seed(0)
    for p in base.model.parameters():
        p.data.normal_(0, 0.4, generator=g)
    return base


def decode_plain(base, prompts, gen, seed):
    """The reference: transformers' own greedy ``generate`` on the model as it is (no emorl decoder)."""
    from emorl.data import encode_prompts, format_prompts
    from emorl.models import eos_ids
    from emorl.train.kscst import completion_mask

    tok = base.tokenizer
    enc = encode_prompts(tok, format_prompts(tok, list(prompts), base.is_seq2seq, base.config.system_prompt),
                         base.config.max_prompt_tokens, base.is_seq2seq, base.device)
    with torch.inference_mode(), plain_generation_config(base.model):
        out = base.model.generate(**enc, do_sample=False, max_new_tokens=gen.max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(base))
    comp = out[:, 1:] if base.is_seq2seq else out[:, enc["input_ids"].shape[1]:]
    mask = completion_mask(comp, eos_ids(base))
    texts = tok.batch_decode(torch.where(mask.bool(), comp, tok.pad_token_id), skip_special_tokens=True)
    return [t.strip() for t in texts], [int(n) for n in mask.sum(1).tolist()]


def test_base_and_one_adapter_through_the_ensemble_match_plain_generate(lively_base, tmp_path):
    gen = GenerationConfig(do_sample=False, max_new_tokens=6)
    plain_base = decode_plain(lively_base, PROMPTS, gen, 0)
    assert any(t for t in plain_base[0])  # non-trivial replies
    add_adapters(lively_base, ["pol_a", "pol_b"], LoraConfig(r=4, alpha=8, dropout=0.0))
    for n, p in lively_base.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    folder = save_adapter(lively_base.model, "pol_b", tmp_path / "pol_b",
                          AdapterInfo(objective="pol_b", base=lively_base.identity))
    dec = Decoder(lively_base, gen, {"pol_b": folder})
    assert dec.decode(MethodSpec("base", "base"), PROMPTS, 0) == plain_base  # adapter switched off
    lively_base.model.set_adapter("pol_b")
    plain_b = decode_plain(lively_base, PROMPTS, gen, 0)
    assert plain_b != plain_base
    from emorl.ensemble.model import EnsembleModel

    got = EnsembleModel(lively_base, None).generate(PROMPTS, [0.0, 1.0], max_new_tokens=6)
    assert list(got.texts) == plain_b[0] and got.lengths.tolist() == plain_b[1]


# ------------------------------------------------------------------------------------------- a small run

LENGTH_OBJECTIVES = "objectives={short: {type: length, target: 3}, long: {type: length, target: 12}}"


def make_run(tmp_path, base, *, baselines=("uniform",), search_modes=()):
    """A run folder with tiny adapters saved to disk (random LoRA), cheap length rewards, and optional
    best.json files, without training."""
    cfg = load_config("tiny", [LENGTH_OBJECTIVES, "eval.prompts=4", "model.seed=3"])
    run = tmp_path / "run"
    cfg.output = str(run)
    cfg.save(run / "config.yaml")
    names = ["short", "long", *baselines]
    add_adapters(base, names, cfg.lora)
    for n, p in base.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    for n in names:
        folder = run / ("adapters" if n in ("short", "long") else "baselines") / n
        objs = [n] if n in ("short", "long") else ["short", "long"]
        save_adapter(base.model, n, folder, AdapterInfo(objective=n, objectives=objs, base=base.identity, steps=4,
                                                        prompts_consumed=8, wall_time_s=2.0,
                                                        extra={"finished": True}))
    for mode in search_modes:
        atomic_write_json(run / "search" / mode / "best.json",
                          {"names": ["short", "long"], "weight_vector": [0.75, 0.25], "aggregate": 0.5,
                           "scores": {}, "points": 9, "decoded": 9, "wall_time_s": 1.0,
                           "anchor": "none" if mode.endswith("-convex") else "base"})
    return cfg, run


def test_resolve_methods_names_what_is_missing(tmp_path, tiny_base):
    cfg, run = make_run(tmp_path, tiny_base, baselines=())
    with pytest.raises(EmorlError, match="strategy uniform"):
        resolve_methods(run, cfg, ["base", "uniform"])
    with pytest.raises(EmorlError, match=r"emorl search --run .* --mode hidden"):
        resolve_methods(run, cfg, ["emorl"])
    with pytest.raises(EmorlError, match="unknown method"):
        resolve_methods(run, cfg, ["emorl2"])
    atomic_write_json(run / "search" / "hidden" / "best.json", {"names": ["long", "short"], "weight_vector": [1, 1]})
    with pytest.raises(EmorlError, match="--fresh"):
        resolve_methods(run, cfg, ["emorl"])
    with pytest.raises(EmorlError, match="'single:<objective>' with one of short, long"):
        resolve_methods(run, cfg, ["single:nope"])
    with pytest.raises(EmorlError, match="twice"):
        resolve_methods(run, cfg, ["singles", "single:long"])
    singles = resolve_methods(run, cfg, ["base", "singles"])[1:]
    assert [(s.name, s.label, list(s.adapters), s.weights) for s in singles] == [
        ("single:short", "short adapter alone", ["short"], [1.0]),
        ("single:long", "long adapter alone", ["long"], [1.0])]


def test_all_zero_best_point_falls_back_to_best_logged_point(tmp_path, tiny_base):
    """A convex mix cannot decode w = 0 (no direction): the best other logged point is used. Anchored, w = 0 is
    the base model and is kept."""
    cfg, run = make_run(tmp_path, tiny_base, baselines=())
    for key, anchor in (("hidden-convex", "none"), ("hidden", "base")):
        d = run / "search" / key
        atomic_write_json(d / "best.json", {"names": ["short", "long"], "weight_vector": [0.0, 0.0],
                                            "aggregate": 0.0, "anchor": anchor})
        rows = [{"kind": "header"}, {"weights": [0, 0], "aggregate": 0.0}, {"weights": [0.5, 0], "aggregate": 0.0},
                {"weights": [0, 1], "aggregate": 0.0}]
        (d / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convex, anchored = resolve_methods(run, cfg, ["emorl-convex", "emorl"])
    assert (convex.weights, convex.anchor, convex.mode) == ([0.5, 0.0], "none", "hidden")
    assert (anchored.weights, anchored.anchor) == ([0.0, 0.0], "base")


def test_evaluate_run_writes_results_and_reuses_unchanged_methods(tmp_path, tiny_base, monkeypatch):
    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden",))
    res = evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert list(res["methods"]) == ["base", "uniform", "emorl"]
    saved = json.loads((run / "eval" / "results.json").read_text())
    assert saved["methods"].keys() == res["methods"].keys() and saved["prompts"] == 4
    emorl = saved["methods"]["emorl"]
    assert emorl["weights"] == {"short": 0.75, "long": 0.25}
    assert emorl["training"]["prompts"] == 16 and set(emorl["training"]["per_adapter"]) == {"short", "long"}
    assert emorl["search"]["points"] == 9
    assert saved["methods"]["base"]["training"]["prompts"] == 0
    # means, CIs and paired differences to EMORL and Uniform, recomputed by hand from the stored replies
    units = {}
    for name in ("base", "uniform", "emorl"):
        rows = [json.loads(x) for x in (run / "eval" / "replies" / f"{name}.jsonl").read_text().splitlines()]
        units[name] = np.array([np.mean(list(r["scores"].values())) for r in rows])
        m = saved["methods"][name]["summary"]["mean_reward"]
        assert m["n"] == 1 and m["mean"] == pytest.approx(units[name].mean())
        # a percentile bootstrap over the 4 (prompt, seed) units: 2000 resamples drawn with seed 0, 2.5/97.5 %
        draws = units[name][np.random.default_rng(0).integers(0, 4, size=(2000, 4))].mean(axis=1)
        assert m["ci95"] == pytest.approx(list(np.quantile(draws, [0.025, 0.975])))
        assert units[name].min() <= m["ci95"][0] and m["ci95"][1] <= units[name].max()
    d = saved["methods"]["base"]["differences"]
    assert set(d) == {"emorl", "uniform"} and set(saved["methods"]["emorl"]["differences"]) == {"uniform", "base"}
    gain = saved["methods"]["emorl"]["differences"]["base"]["mean_reward"]  # each method's gain over the base
    assert gain["mean"] == pytest.approx(float((units["emorl"] - units["base"]).mean()))
    assert d["emorl"]["mean_reward"]["mean"] == pytest.approx(float((units["base"] - units["emorl"]).mean()))
    lo, hi = d["uniform"]["mean_reward"]["ci95"]
    assert d["uniform"]["mean_reward"]["resolved"] == (lo > 0 or hi < 0)
    lines = (run / "eval" / "replies" / "uniform.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])["scores"]) == {"short", "long"}
    # nothing changed: nothing is decoded again; a changed setting re-decodes every method
    calls = []
    monkeypatch.setattr(Decoder, "decode_finish", lambda self, s, p, seed, kl_rows=0: calls.append(s.name)
                        or (["x"] * len(p), [1] * len(p), ["length"] * len(p), None))
    evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert calls == []
    evaluate_run(run, cfg, ["uniform"], base=tiny_base, progress=False, keep_others=True)
    assert list(json.loads((run / "eval" / "results.json").read_text())["methods"]) == ["uniform", "base", "emorl"]
    cfg.eval.generation.max_new_tokens = 5
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert calls == ["base", "uniform"] and list(res["methods"]) == ["base", "uniform"]


def test_evaluating_a_method_added_later_keeps_the_old_results(tmp_path, tiny_base):
    """`emorl evaluate --methods NEW` on an evaluated run (e.g. after `emorl train --strategy gdpo`): the old methods'
    results stay as they were and the new one is added (it raised KeyError: the merge looked the new name up among
    the old results)."""
    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden",))
    first = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    res = evaluate_run(run, cfg, ["emorl"], base=tiny_base, progress=False, keep_others=True)
    assert list(res["methods"]) == ["emorl", "base", "uniform"]
    saved = json.loads((run / "eval" / "results.json").read_text())
    assert list(saved["methods"]) == ["emorl", "base", "uniform"]
    for name in ("base", "uniform"):
        assert saved["methods"][name]["per_seed"] == first["methods"][name]["per_seed"]
    assert set(saved["methods"]["emorl"]["differences"]) == {"uniform", "base"}


def test_sampled_seeds_give_a_spread_and_greedy_decodes_once(tmp_path, tiny_base):
    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.generation.do_sample = False
    cfg.eval.seeds = [0, 1, 2]
    res = evaluate_run(run, cfg, ["uniform"], base=tiny_base, progress=False)
    assert res["seeds"] == [0] and len(res["methods"]["uniform"]["per_seed"]) == 1  # greedy: one decode
    cfg.eval.generation.do_sample = True
    res = evaluate_run(run, cfg, ["uniform"], base=tiny_base, progress=False)
    per_seed = res["methods"]["uniform"]["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1, 2]
    m, s = mean_std([r["length_tokens"] for r in per_seed])
    stat = res["methods"]["uniform"]["summary"]["length_tokens"]
    assert {k: stat[k] for k in ("mean", "std", "n")} == {"mean": m, "std": s, "n": 3}
    assert stat["ci95"][0] <= m <= stat["ci95"][1] and res["bootstrap"]["n_units"] == 3 * len(eval_prompts(cfg))


def test_training_cost_counts_a_shared_session_once(tmp_path, tiny_base):
    _, run = make_run(tmp_path, tiny_base, baselines=())
    spec = MethodSpec("emorl", "ensemble", "hidden", {o: run / "adapters" / o for o in ("short", "long")})
    assert training_cost(spec)["wall_time_s"] == 4.0  # no session log: each adapter's own time, summed
    atomic_write_json(run / "curves" / "single-short+long.json",
                      {"short": {"wall_time_s": 2.0}, "long": {"wall_time_s": 2.0}})
    cost = training_cost(spec)
    assert cost["wall_time_s"] == 2.0 and cost["sessions"] == 1 and cost["prompts"] == 16


def test_convex_mixing_ignores_the_scale_anchored_mixing_does_not(lively_base):
    """The convex rule (anchor none) decodes w / sum(w): w and c·w give the same samples. Anchored, the scale is each
    adapter's strength, for hidden mixing as for parameter mixing (task arithmetic); the parameter average is
    convex too."""
    add_adapters(lively_base, ["pa", "pb"], LoraConfig(r=4, alpha=8, dropout=0.0))
    for n, p in lively_base.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    from emorl.ensemble.model import EnsembleModel

    dec = Decoder(lively_base, GenerationConfig(do_sample=True, max_new_tokens=6, top_k=0))
    folders = {"pa": None, "pb": None}
    dec._ens[tuple(folders)] = EnsembleModel(lively_base, None)  # the adapters in memory (no folders)
    def spec(name, mode, w, anchor):
        return MethodSpec(name, "ensemble", mode, folders, w, anchor=anchor)

    for mode in ("hidden", "params"):
        small = dec.decode(spec("m", mode, [0.5, 0.25], "none"), PROMPTS, 7)
        large = dec.decode(spec("m", mode, [1.0, 0.5], "none"), PROMPTS, 7)
        assert small == large, mode
        a = dec.decode(spec("m", mode, [0.5, 0.25], "base"), PROMPTS, 7)
        b = dec.decode(spec("m", mode, [1.0, 0.5], "base"), PROMPTS, 7)
        assert a != b, mode  # anchored: the scale is part of the model


def test_generate_method_reproduces_the_evaluated_replies(tmp_path, tiny_base, capsys):
    """`emorl generate --run RUN --method M --seed S` decodes M exactly as the evaluation did (its stored weights,
    mode and anchor; the run's eval.generation): the same replies as RUN/eval/replies/M.jsonl for seed S."""
    from emorl.cli import main
    from emorl.methods import eval_prompts

    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden", "params-convex"))
    cfg.eval.seeds = [0, 5]
    cfg.model = tiny_base.config  # the base the adapters were made on, with its prompt format
    cfg.save(run / "config.yaml")
    evaluate_run(run, cfg, ["base", "emorl", "soups-avg", "uniform"], base=tiny_base, progress=False)
    prompts = eval_prompts(cfg)
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    for method in ("base", "emorl", "soups-avg", "uniform"):
        stored = [json.loads(x) for x in (run / "eval" / "replies" / f"{method}.jsonl").read_text().splitlines()]
        assert main(["generate", "--run", str(run), "--method", method, "--seed", "5", "--input", str(inp)]) == 0
        got = [json.loads(x)["reply"] for x in capsys.readouterr().out.splitlines()]
        assert got == [r["reply"] for r in stored if r["seed"] == 5], method
    out = tmp_path / "base.jsonl"  # written to a file too (the log line after it once crashed for --method)
    assert main(["generate", "--run", str(run), "--method", "base", "--seed", "5", "--input", str(inp),
                 "--output", str(out)]) == 0
    assert [json.loads(x)["reply"] for x in out.read_text().splitlines()] == [
        json.loads(x)["reply"] for x in (run / "eval" / "replies" / "base.jsonl").read_text().splitlines()
        if json.loads(x)["seed"] == 5]
    assert len({tuple(json.loads(x)["reply"] for x in (run / "eval" / "replies" / f"{m}.jsonl").read_text()
                      .splitlines()) for m in ("base", "emorl", "uniform")}) == 3  # the methods do differ


def test_logit_mixing_under_a_linear_head_is_reported_once(tmp_path, tiny_base):
    """With a linear LM head, logit mixing equals hidden mixing token for token (checked here), so the evaluation
    decodes it once and reports the row with the reason."""
    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden", "logits"))
    from emorl.ensemble.model import EnsembleModel

    ens = EnsembleModel(tiny_base, {n: run / "adapters" / n for n in ("short", "long")})
    kw = {"max_new_tokens": 8, "do_sample": True, "seed": 3, "top_k": 0}
    assert torch.equal(ens.generate(PROMPTS, [0.75, 0.25], mode="hidden", **kw).token_ids,
                       ens.generate(PROMPTS, [0.75, 0.25], mode="logits", **kw).token_ids)
    res = evaluate_run(run, cfg, ["emorl", "logits"], base=tiny_base, progress=False)
    logits, emorl = res["methods"]["logits"], res["methods"]["emorl"]
    assert logits["same_as"] == "emorl" and "linear LM head" in logits["note"]
    assert logits["per_seed"] == emorl["per_seed"] and logits["label"] == "Logit mixing"
    assert not (run / "eval" / "replies" / "logits.jsonl").exists()

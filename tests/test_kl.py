"""KL to the base (emorl.kl), on hand-checkable cases: the formula on a three-token vocabulary; the base against
itself is 0 without truncation and -log(kept mass) with it; a one-adapter method's KL equals a direct computation with
the peft model (teacher-forced logits, warped by hand); the evaluation stores it per reply and per method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_evaluate import make_run

from emorl.config import GenerationConfig
from emorl.decoding import Decoder
from emorl.divergence import base_logits, token_kl
from emorl.evaluate import evaluate_run, resolve_methods
from emorl.kl import method_kl

PROMPTS = ["I lost my job today.", "My sister stopped calling me.", "I can't sleep before exams."]


def test_token_kl_by_hand():
    q = torch.tensor([[0.5, 0.5, 0.0]]).log()
    p = torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert float(token_kl(q, p)[0]) == pytest.approx(math.log(2))
    assert float(token_kl(p, p)[0]) == pytest.approx(0.0, abs=1e-7)


def specs_of(tmp_path, tiny_base):
    cfg, run = make_run(tmp_path, tiny_base)
    return cfg, run, {s.name: s for s in resolve_methods(run, cfg, ["base", "uniform"])}


def test_base_against_itself(tmp_path, tiny_base):
    cfg, run, specs = specs_of(tmp_path, tiny_base)
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    dec = Decoder(tiny_base, gen, {"uniform": run / "baselines" / "uniform"})
    kl, _ = method_kl(dec, specs["base"], PROMPTS, 0, gen)
    np.testing.assert_allclose(kl, 0.0, atol=1e-5)
    # top-k 1: the sampled distribution is the argmax alone, so KL_t = -log p_T(argmax token) of the base
    gen1 = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=1, top_p=1.0)
    dec1 = Decoder(tiny_base, gen1, {"uniform": run / "baselines" / "uniform"})
    kl1, _ = method_kl(dec1, specs["base"], PROMPTS, 0, gen1)
    res = dec1.result(specs["base"], PROMPTS, 0)
    logits = base_logits(tiny_base, PROMPTS, res.token_ids)
    for b in range(len(PROMPTS)):
        n = int(res.lengths[b])
        lp = torch.log_softmax(logits[b, :n] / 0.7, -1)
        assert kl1[b] == pytest.approx(float(-lp.max(-1).values.mean()), rel=1e-4)
    assert (kl1 > 0).all()


def test_one_adapter_method_equals_a_direct_peft_computation(tmp_path, tiny_base):
    cfg, run, specs = specs_of(tmp_path, tiny_base)
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=1.0)
    dec = Decoder(tiny_base, gen, {"uniform": run / "baselines" / "uniform"})
    kl, same = method_kl(dec, specs["uniform"], PROMPTS, 1, gen)
    res = dec.result(specs["uniform"], PROMPTS, 1)  # the same seed: the same tokens
    assert same == len(PROMPTS)
    ref = base_logits(tiny_base, PROMPTS, res.token_ids)
    # the adapter's own logits, teacher-forced through the peft model with that adapter active
    from emorl.data import encode_prompts, format_prompts
    from emorl.models import position_ids

    model = tiny_base.model
    model.load_adapter(str(run / "baselines" / "uniform"), adapter_name="direct")
    model.set_adapter("direct")
    tok = tiny_base.tokenizer
    enc = encode_prompts(tok, format_prompts(tok, PROMPTS, False, tiny_base.config.system_prompt),
                         tiny_base.config.max_prompt_tokens, False)
    T = res.token_ids.shape[1]
    full = torch.cat([enc["input_ids"], res.token_ids], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(res.token_ids)], 1)
    with torch.no_grad():
        own = model(input_ids=full, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -T - 1:-1].float()
    for b in range(len(PROMPTS)):
        n = int(res.lengths[b])
        x = own[b, :n] / 0.8
        kth = x.topk(5, -1).values[:, -1:]
        logq = torch.log_softmax(torch.where(x >= kth, x, torch.tensor(-math.inf)), -1)
        logp = torch.log_softmax(ref[b, :n] / 0.8, -1)
        q = logq.exp()
        want = float(torch.where(q > 0, q * (logq - logp), 0.0).sum(-1).mean())
        assert kl[b] == pytest.approx(want, rel=1e-3, abs=1e-5)
    assert kl.max() > 0


def test_evaluation_stores_kl_per_reply_and_method(tmp_path, tiny_base, caplog):
    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.kl = True
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    for name in ("base", "uniform"):
        rows = [json.loads(x) for x in (run / "eval" / "replies" / f"{name}.jsonl").read_text().splitlines()]
        m = res["methods"][name]
        assert m["summary"]["kl_per_token"]["mean"] == pytest.approx(np.mean([r["kl"] for r in rows]))
        assert m["kl_reproduced"] == [len(rows), len(rows)]
        assert "ci95" in m["summary"]["kl_per_token"]
    assert res["methods"]["uniform"]["summary"]["kl_per_token"]["mean"] > 0
    # on the first 2 prompts only: the same replies (the seed's uniforms are drawn row by row), so the same values
    full = [json.loads(x)["kl"] for x in (run / "eval" / "replies" / "uniform.jsonl").read_text().splitlines()]
    cfg.eval.kl_prompts = 2
    with caplog.at_level("WARNING", logger="emorl.kl"):
        res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert "reproduced" not in caplog.text  # 2 of the 2 re-decoded replies: no warning (it used to count all rows)
    rows = [json.loads(x) for x in (run / "eval" / "replies" / "uniform.jsonl").read_text().splitlines()]
    assert [r.get("kl") for r in rows] == [*full[:2], *[None] * (len(rows) - 2)]
    assert res["methods"]["uniform"]["kl_reproduced"] == [2, 2]
    assert res["methods"]["uniform"]["summary"]["kl_per_token"]["mean"] == pytest.approx(np.mean(full[:2]))
    cfg.eval.kl = False
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert "kl_per_token" not in res["methods"]["uniform"]["summary"]


def test_scores_of_the_first_rows_only_change_nothing_else(tmp_path, tiny_base):
    """``output_scores=n`` keeps the scores of the first n prompts: the same tensors as ``output_scores=True``'s first
    n rows, the same replies as without scores."""
    cfg, run, specs = specs_of(tmp_path, tiny_base)
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5, top_p=1.0)
    dec = Decoder(tiny_base, gen, {"uniform": run / "baselines" / "uniform"})
    plain = dec.result(specs["uniform"], PROMPTS, 3)
    every = dec.result(specs["uniform"], PROMPTS, 3, output_scores=True)
    first = dec.result(specs["uniform"], PROMPTS, 3, output_scores=2)
    assert plain.texts == every.texts == first.texts
    assert plain.scores is None and every.scores.shape[1] == 3 and first.scores.shape[1] == 2
    torch.testing.assert_close(first.scores, every.scores[:, :2])


def test_evaluation_measures_kl_in_its_own_decode(tmp_path, tiny_base, monkeypatch):
    """eval.kl costs no second decode: every method is decoded once per seed, and its first kl_prompts replies
    carry the KL a separate re-decode (method_kl) measures on them."""
    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.kl, cfg.eval.kl_prompts = True, 2
    cfg.eval.judges = {"brief": {"type": "length", "target": 3}}  # the judges re-summarise after the decode
    calls = []
    real = Decoder.result
    monkeypatch.setattr(Decoder, "result", lambda self, spec, *a, **k: calls.append(spec.name) or real(self, spec,
                                                                                                       *a, **k))
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert sorted(calls) == ["base", "uniform"]
    monkeypatch.setattr(Decoder, "result", real)
    specs = {s.name: s for s in resolve_methods(run, cfg, ["base", "uniform"])}
    dec = Decoder(tiny_base, cfg.eval.generation, {"uniform": run / "baselines" / "uniform"})
    for name in ("base", "uniform"):
        rows = [json.loads(x) for x in (run / "eval" / "replies" / f"{name}.jsonl").read_text().splitlines()]
        assert all("kl" in r for r in rows[:2]) and not any("kl" in r for r in rows[2:])
        want, same = method_kl(dec, specs[name], [r["prompt"] for r in rows[:2]], 0, cfg.eval.generation,
                               [r["reply"] for r in rows[:2]])
        assert same == 2
        np.testing.assert_allclose([r["kl"] for r in rows[:2]], want, rtol=1e-4, atol=1e-6)
        assert res["methods"][name]["kl_reproduced"] == [2, 2]
        lo, hi = res["methods"][name]["summary"]["kl_per_token"]["ci95"]  # the CI survives the judges' summary
        assert lo <= res["methods"][name]["summary"]["kl_per_token"]["mean"] <= hi
        assert res["methods"][name]["summary"]["kl_per_token"]["mean"] == pytest.approx(float(np.mean(want)),
                                                                                       rel=1e-4, abs=1e-6)


def test_report_shows_kl_column_figure_and_judges(tmp_path, tiny_base):
    from emorl.report import write_report

    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.kl = True
    cfg.eval.judges = {"brief": {"type": "length", "target": 3}}
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    text = write_report(run).read_text()
    assert "KL to base / token" in text and "## Reward against KL to the base" in text
    assert (run / "figures" / "reward_vs_kl.png").stat().st_size > 0
    assert "## Held-out judges" in text
    kl = res["methods"]["uniform"]["summary"]["kl_per_token"]["mean"]
    assert f"{kl:.4f}" in text
    summary = json.loads((run / "results.json").read_text())
    assert summary["judges"]["names"] == ["brief"] and "figures/reward_vs_kl.png" in summary["figures"]


def test_greedy_diversity_both_forms_and_the_sentence(tmp_path, tiny_base):
    from emorl.metrics import distinct_n, diversity_reference
    from emorl.report.diversity import diversity_summary

    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden",))
    cfg.eval.generation.do_sample = True
    cfg.eval.greedy_diversity = True
    res = evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    from emorl.evaluate import eval_prompts

    prompts = eval_prompts(cfg)
    gen = GenerationConfig(**{**cfg.eval.generation.__dict__, "do_sample": False})
    specs = {s.name: s for s in resolve_methods(run, cfg, ["base", "uniform", "emorl"])}
    dec = Decoder(tiny_base, gen, {"uniform": run / "baselines" / "uniform"})
    for name in ("base", "uniform", "emorl"):
        texts, _ = dec.decode(specs[name], prompts, 0)
        g = res["methods"][name]["greedy"]
        assert g["diversity2"] == pytest.approx(distinct_n(texts)) and g["diversity2_ref"] == pytest.approx(
            diversity_reference(texts))
        assert g["sampled"]["diversity2"] == res["methods"][name]["summary"]["diversity2"]["mean"]
    d = diversity_summary(res)
    assert len(d["table"]["rows"]) == 3 and d["sentences"][0].startswith("Diversity-2 of EMORL, sampled, across")
    assert "The paper reports EMORL highest" in d["sentences"][1]

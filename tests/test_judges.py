"""Held-out judges (eval.judges): scored on every method's stored replies, recomputable by hand from the reply files,
with paired differences; reused while unchanged (no re-decoding when only the judges change); pairwise judges see the
reference method's reply to the same prompt; the report's judge section."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_evaluate import make_run

from emorl.decoding import Decoder
from emorl.evaluate import evaluate_run
from emorl.judges import check_judges
from emorl.report.judges import gains_table, judges_markdown, judges_summary, lead_sentence, verdict
from emorl.rewards import register_reward
from emorl.rewards.text import words
from emorl.utils import EmorlError

CALLS: Counter[str] = Counter()


@register_reward("test-longer-wins")
class LongerWins:
    """A pairwise judge for tests: the reply with more words wins (1), fewer loses (0), equal ties (0.5)."""

    def __init__(self, name, options, base=None):
        self.name = name
        self.mode = "pairwise"
        self.reference = options.get("reference", kind=str)

    def __call__(self, prompts, replies):
        raise AssertionError("a pairwise judge is called through compare()")

    def compare(self, prompts, replies, references):
        CALLS["pairwise"] += len(replies)
        a = np.array([len(words(r)) for r in replies])
        b = np.array([len(words(r)) for r in references])
        return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


@register_reward("test-counted-length")
class CountedLength:
    def __init__(self, name, options, base=None):
        self.name = name
        self.target = options.get("target", 2.0, float)

    def __call__(self, prompts, replies):
        CALLS["pointwise"] += len(replies)
        n = np.array([len(words(r)) for r in replies], float)
        return 1.0 / (1.0 + (n - self.target) ** 2)


def rows(run, method):
    return [json.loads(x) for x in (run / "eval" / "replies" / f"{method}.jsonl").read_text().splitlines()]


def test_judges_score_every_method_with_paired_differences(tmp_path, tiny_base, monkeypatch):
    cfg, run = make_run(tmp_path, tiny_base, search_modes=("hidden",))
    cfg.eval.judges = {"brief": {"type": "test-counted-length", "target": 2},
                       "vs_uniform": {"type": "test-longer-wins", "reference": "uniform"}}
    CALLS.clear()
    res = evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert res["judges"] == ["brief", "vs_uniform"]
    hand = {}
    for name in ("base", "uniform", "emorl"):
        rs = rows(run, name)
        brief = np.array([1 / (1 + (len(words(r["reply"])) - 2) ** 2) for r in rs])
        np.testing.assert_allclose([r["judges"]["brief"] for r in rs], brief)
        ref = rows(run, "uniform")
        longer = np.array([np.sign(len(words(a["reply"])) - len(words(b["reply"]))) / 2 + 0.5
                           for a, b in zip(rs, ref, strict=True)])
        np.testing.assert_allclose([r["judges"]["vs_uniform"] for r in rs], longer)
        s = res["methods"][name]["summary"]
        assert s["judge/brief"]["mean"] == pytest.approx(brief.mean())
        assert s["judge_mean"]["mean"] == pytest.approx(np.mean((brief + longer) / 2))
        assert s["judge/brief"]["ci95"][0] <= s["judge/brief"]["mean"] <= s["judge/brief"]["ci95"][1]
        hand[name] = (brief + longer) / 2
    assert res["methods"]["uniform"]["summary"]["judge/vs_uniform"]["mean"] == 0.5  # the reference against itself
    d = res["methods"]["emorl"]["differences"]["base"]["judge_mean"]
    assert d["mean"] == pytest.approx(float((hand["emorl"] - hand["base"]).mean()))
    assert CALLS == {"pointwise": 12, "pairwise": 12}
    # unchanged: nothing judged or decoded again; a changed judge spec re-judges without decoding
    decoded = []
    monkeypatch.setattr(Decoder, "decode_finish", lambda self, s, p, seed, kl_rows=0: decoded.append(s.name)
                        or (["x"] * len(p), [1] * len(p), ["length"] * len(p), None))
    evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert CALLS == {"pointwise": 12, "pairwise": 12} and decoded == []
    cfg.eval.judges["brief"]["target"] = 5
    res = evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert CALLS["pointwise"] == 24 and decoded == []
    rs = rows(run, "emorl")
    assert res["methods"]["emorl"]["summary"]["judge/brief"]["mean"] == pytest.approx(
        np.mean([1 / (1 + (len(words(r["reply"])) - 5) ** 2) for r in rs]))
    # the report's section
    summary = judges_summary(res)
    assert summary["table"]["columns"] == ["Method", "brief", "vs_uniform", "Judges' mean",
                                           "Mean reward (training rewards)"]
    assert [r[0] for r in summary["gains"]["rows"]] == ["Uniform Weighted", "EMORL"]
    text = "\n".join(judges_markdown({"judges": summary}))
    assert "## Held-out judges" in text and "Gain over base: judges" in text
    # judges dropped from the config: their columns go too
    cfg.eval.judges = {}
    res = evaluate_run(run, cfg, ["base", "uniform", "emorl"], base=tiny_base, progress=False)
    assert "judges" not in res and not any(k.startswith("judge") for k in res["methods"]["emorl"]["summary"])
    assert judges_summary(res) is None


def test_judge_config_errors_come_before_decoding(tmp_path, tiny_base):
    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.judges = {"short": {"type": "length"}}
    with pytest.raises(EmorlError, match="eval.judges.short: a judge may not share its name with an objective"):
        check_judges(cfg, ["base"])
    cfg.eval.judges = {"pair": {"type": "llm-judge", "mode": "pairwise", "reference": "soups"}}
    with pytest.raises(EmorlError, match="eval.judges.pair.reference: method 'soups' is not among"):
        evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert not (run / "eval" / "results.json").exists()


def gain(mean, lo, hi):
    return {"mean": mean, "ci95": [lo, hi], "resolved": lo > 0 or hi < 0}


def test_lead_sentence_and_verdicts_by_hand():
    res = {"judges": ["j"], "methods": {
        "uniform": {"label": "Uniform Weighted", "summary": {}},
        "emorl": {"label": "EMORL", "summary": {}, "differences": {
            "uniform": {"mean_reward": gain(0.09, 0.07, 0.11), "judge/j": gain(0.02, -0.01, 0.05)},
            "base": {"mean_reward": gain(0.1, 0.05, 0.15), "judge/j": gain(-0.1, -0.2, -0.05)}}}}}
    assert lead_sentence(res) == ("EMORL − Uniform Weighted: training rewards +0.090 [+0.070, +0.110], held-out "
                                  "judges +0.020 [-0.010, +0.050] (n.s.). EMORL's lead over Uniform Weighted is not "
                                  "resolved on the judges (their CI holds 0).")
    assert gains_table(res)[1] == [["EMORL", "+0.100 [+0.050, +0.150]", "-0.100 [-0.200, -0.050]",
                                    "no (training rewards up, judges down)"]]
    assert verdict(1, 1) == "yes (both up)" and verdict(0, None) == "–"


# ------------------------------------------------------------------------------ held-out prompt sets (eval.extra_sets)

def test_extra_sets_are_evaluated_paired_and_reported_apart(tmp_path, tiny_base, monkeypatch):
    from emorl.report import write_report

    cfg, run = make_run(tmp_path, tiny_base)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["My cat is sick.", "I moved to a new city.",
                                                                    "I failed my driving test.", "My cat is sick."]))
    cfg.eval.extra_sets = {"mine": {"path": str(f), "prompt_field": "text"}}
    cfg.eval.judges = {"brief": {"type": "length", "target": 3}}
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    x = res["extra_sets"]["mine"]
    assert x["prompts"] == 3 and res["prompts"] == 4  # a repeated prompt counted once; the test split unchanged
    folder = run / "eval" / "sets" / "mine"
    for name in ("base", "uniform"):
        rs = [json.loads(line) for line in (folder / "eval" / "replies" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rs] == ["My cat is sick.", "I moved to a new city.", "I failed my driving test."]
        s = x["methods"][name]["summary"]
        assert s["mean_reward"]["mean"] == pytest.approx(np.mean([np.mean(list(r["scores"].values())) for r in rs]))
        assert s["judge/brief"]["mean"] == pytest.approx(np.mean([r["judges"]["brief"] for r in rs]))
    d = x["methods"]["base"]["differences"]["uniform"]["mean_reward"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # unchanged: reused without decoding; the report has its own section
    decoded = []
    monkeypatch.setattr(Decoder, "decode_finish", lambda self, s, p, seed, kl_rows=0: decoded.append(s.name)
                        or (["x"] * len(p), [1] * len(p), ["length"] * len(p), None))
    res2 = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert decoded == [] and res2["extra_sets"]["mine"]["methods"]["uniform"]["summary"]["mean_reward"] == \
        x["methods"]["uniform"]["summary"]["mean_reward"]
    text = write_report(run).read_text()
    assert "## Held-out prompt sets" in text and "### `mine`: 3 prompts" in text


def test_extra_set_errors_name_the_key(tmp_path, tiny_base):
    from emorl.heldout_prompts import set_prompts

    with pytest.raises(EmorlError, match="eval.extra_sets.x.path: .* is not a file"):
        set_prompts("x", {"path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(EmorlError, match="eval.extra_sets.x.prompt: unknown key"):
        set_prompts("x", {"prompt": 3, "source": "chitchat-heldout"})
    with pytest.raises(EmorlError, match="eval.extra_sets.x.source: the built-in set is 'chitchat-heldout'"):
        set_prompts("x", {"source": "chitchat"})
    cfg, run = make_run(tmp_path, tiny_base)
    cfg.eval.extra_sets = {"bad": {"path": str(tmp_path / "missing.csv")}}
    with pytest.raises(EmorlError, match="eval.extra_sets.bad.path"):
        evaluate_run(run, cfg, ["base"], base=tiny_base, progress=False)
    assert not (run / "eval" / "results.json").exists()  # refused before decoding


def test_an_extra_set_decodes_only_its_methods(tmp_path, tiny_base, monkeypatch):
    """``methods`` on a set: only those are decoded on it (the others are not), and a name that is no method of the
    run is refused before any decoding, naming the key."""
    cfg, run = make_run(tmp_path, tiny_base)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["My cat is sick.", "I moved to a new city."]))
    cfg.eval.extra_sets = {"mine": {"path": str(f), "methods": ["nope"]}}
    with pytest.raises(EmorlError, match="eval.extra_sets.mine.methods: 'nope' is not a method of this run"):
        evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert not (run / "eval" / "results.json").exists()
    cfg.eval.extra_sets = {"mine": {"path": str(f), "methods": ["uniform"]}}
    res = evaluate_run(run, cfg, ["base", "uniform"], base=tiny_base, progress=False)
    assert list(res["extra_sets"]["mine"]["methods"]) == ["uniform"] and list(res["methods"]) == ["base", "uniform"]
    folder = run / "eval" / "sets" / "mine" / "eval" / "replies"
    assert (folder / "uniform.jsonl").exists() and not (folder / "base.jsonl").exists()


def test_chitchat_heldout_is_disjoint_from_the_builtin_data_and_its_filter():
    from emorl.data.builtin import FIRST_PERSON_EMOTION, LOSS, dedup_key, default_records
    from emorl.heldout_prompts import chitchat_heldout

    held = chitchat_heldout(100)
    assert len(held) == 100
    builtin = {dedup_key(r.prompt) for r in default_records()}
    assert not builtin & {dedup_key(r.prompt) for r in held}
    assert not any(FIRST_PERSON_EMOTION.search(r.prompt.lower()) or LOSS.search(r.prompt.lower()) for r in held)
    assert all(50 <= len(r.prompt) <= 200 and "?" not in r.prompt for r in held)

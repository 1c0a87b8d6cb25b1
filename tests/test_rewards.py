"""Tests of emorl.rewards: the contract (registry, strict options, validating `score`), each built-in type
against a plainly written reference computation, and ranking checks of the proxies on hand-written replies."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from emorl.rewards import REGISTRY, RewardError, build_reward, build_rewards, register_reward, score
from emorl.rewards.lm import nll_to_score
from emorl.rewards.text import copy_ratio

# ------------------------------------------------------------------------------ hand-written ranking examples
# One client statement per row, with a reflective, an off-topic, an empathic and a dismissive reply and a
# word salad built from the statement's own words (so it is on topic but not language).
STATEMENTS = [
    "I've been feeling so overwhelmed at work lately, and I can't sleep.",
    "My best friend stopped talking to me and I don't know why.",
    "I failed my driving test again and I feel like such a loser.",
    "My dad was diagnosed with cancer last week and I'm terrified.",
    "I moved to a new city and I don't know anyone here. It's so lonely.",
]
REFLECTIVE = [
    "It sounds like work has been piling up and it's keeping you awake at night.",
    "It hurts to lose a close friend without knowing what happened.",
    "Failing again must be really discouraging, and you're being hard on yourself.",
    "You're scared about what your father's diagnosis could mean.",
    "Being somewhere new without friends around can feel really isolating.",
]
OFF_TOPIC = [
    "What is the capital of France?",
    "The weather is nice today, let's go for a walk.",
    "Pizza is my favourite food.",
    "I bought a new laptop yesterday.",
    "Did you see the football game last night?",
]
EMPATHIC = [
    "That sounds exhausting. I'm sorry things have been so stressful for you.",
    "I'm really sorry, that must be confusing and painful.",
    "I'm sorry, that's so frustrating. It doesn't make you a loser at all.",
    "I'm so sorry. That is frightening news, and it's natural to feel terrified.",
    "Moving is hard, and feeling lonely in a new place is completely understandable.",
]
DISMISSIVE = [
    "Everyone is stressed, stop whining.",
    "Whatever, get new friends.",
    "Lol, yeah you kind of are.",
    "Everybody gets sick eventually, get over it.",
    "So go out more, not my problem.",
]
WORD_SALAD = [
    "work the lately purple seven under banana quickly sleep of",
    "friend table why the why running blue know eleven",
    "test again loser driving window jump the green of",
    "cancer dad terrified week the of around spoon",
    "city lonely know the new of chair whisper ten",
]


@pytest.fixture(scope="module")
def minilm_rewards():
    return build_rewards({"reflection": {"type": "reflection"}, "empathy": {"type": "empathy"}})


# ------------------------------------------------------------------------------ registry and options

def test_builtin_types_registered():
    assert {"fluency", "perplexity", "reflection", "empathy", "hf-classifier", "python", "length",
            "nontoxic", "llm-judge", "empathy-heldout", "reflection-pmi"} <= set(REGISTRY)


def test_unknown_type_lists_choices():
    with pytest.raises(RewardError, match=r"objectives\.brevity\.type: unknown reward type 'short'.*length"):
        build_reward("brevity", {"type": "short"})


def test_unknown_option_names_key_and_valid_options():
    with pytest.raises(RewardError, match=r"objectives\.brevity\.targett: unknown option.*target, tolerance"):
        build_reward("brevity", {"type": "length", "targett": 10})


def test_missing_and_bad_options():
    with pytest.raises(RewardError, match=r"objectives\.judge\.model: required"):
        build_reward("judge", {"type": "hf-classifier"})
    with pytest.raises(RewardError, match=r"objectives\.judge\.transform: 'relu' is not one of 'sigmoid', 'softmax'"):
        build_reward("judge", {"type": "hf-classifier", "model": "x", "transform": "relu"})
    with pytest.raises(RewardError, match=r"objectives\.brevity\.target: expected float, got 'ten'"):
        build_reward("brevity", {"type": "length", "target": "ten"})
    with pytest.raises(RewardError, match=r"objectives\.brevity\.tolerance: expected a number of words > 0, got 0"):
        build_reward("brevity", {"type": "length", "tolerance": 0})
    with pytest.raises(RewardError, match=r"objectives\.refl\.copy_penalty: expected a number in \[0, 1\]"):
        build_reward("refl", {"type": "reflection", "copy_penalty": 2})
    with pytest.raises(RewardError, match=r"objectives\.x\.type: missing"):
        build_reward("x", {})


def test_custom_type_and_validation_before_any_load():
    loads = []

    @register_reward("test-constant")
    class Constant:
        def __init__(self, name, opts, base=None):
            self.name = name
            self.value = opts.get("value", 0.5, float)

        def load(self):
            loads.append(self.name)

        def __call__(self, prompts, responses):
            return np.full(len(prompts), self.value)

    try:
        rewards = build_rewards({"a": {"type": "test-constant", "value": 0.25}, "b": {"type": "test-constant"}})
        assert loads == ["a", "b"]
        np.testing.assert_allclose(score(rewards["a"], ["p", "q"], ["r", "s"]), [0.25, 0.25])
        loads.clear()
        with pytest.raises(RewardError, match=r"objectives\.b\.valeu: unknown option"):
            build_rewards({"a": {"type": "test-constant"}, "b": {"type": "test-constant", "valeu": 1}})
        assert loads == []  # the typo in the second spec is found before the first reward loads anything
    finally:
        REGISTRY.pop("test-constant")


# ------------------------------------------------------------------------------ score(): validation

class _Fixed:
    def __init__(self, values, name="fixed"):
        self.name, self.values = name, values

    def __call__(self, prompts, responses):
        return self.values


def test_score_accepts_and_returns_float_array():
    out = score(_Fixed([0.0, 1.0, 0.25]), ["a", "b", "c"], ["x", "y", "z"])
    assert out.dtype == np.float64 and out.shape == (3,)
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.25])
    assert score(_Fixed([]), [], []).shape == (0,)


def test_score_names_the_offending_sample():
    long_prompt = "p" * 200
    with pytest.raises(RewardError) as e:
        score(_Fixed([0.5, float("nan"), 0.1], name="emp"), ["a", long_prompt, "c"], ["x", "reply two", "z"])
    msg = str(e.value)
    assert "'emp'" in msg and "sample 1 of 3" in msg and "'reply two'" in msg and "nan" in msg
    assert "p" * 77 + "..." in msg and "p" * 81 not in msg  # prompt truncated to ~80 characters
    with pytest.raises(RewardError, match=r"returned 1\.5 for sample 2 of 3"):
        score(_Fixed([0.5, 0.2, 1.5]), ["a", "b", "c"], ["x", "y", "z"])
    with pytest.raises(RewardError, match=r"returned -0\.1 for sample 0"):
        score(_Fixed([-0.1, 0.2]), ["a", "b"], ["x", "y"])
    with pytest.raises(RewardError, match=r"shape \(2,\) for 3 samples"):
        score(_Fixed([0.5, 0.2]), ["a", "b", "c"], ["x", "y", "z"])
    with pytest.raises(RewardError, match=r"returned inf"):
        score(_Fixed(np.array([np.inf])), ["a"], ["x"])
    with pytest.raises(RewardError, match="2 prompts but 1 responses"):
        score(_Fixed([0.5]), ["a", "b"], ["x"])


def test_score_locates_a_raising_sample():
    class Boom:
        name = "boom"

        def __call__(self, prompts, responses):
            if any("kaboom" in r for r in responses):
                raise ValueError("cannot parse")
            return np.zeros(len(responses))

    with pytest.raises(RewardError, match=r"'boom' raised ValueError: cannot parse on sample 2 of 3.*'kaboom!'"):
        score(Boom(), ["a", "b", "c"], ["fine", "ok", "kaboom!"])


# ------------------------------------------------------------------------------ python, length, nontoxic

def _write_module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


def test_python_reward_both_signatures(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_rewards_mod", """
        def ours(prompts, responses):
            return [min(1.0, len(r) / 10) for r in responses]

        def trl(prompts, completions, bonus=0.0, **kwargs):
            assert "completion_ids" not in kwargs
            return [0.5 + bonus if p in c else 0.0 for p, c in zip(prompts, completions)]
    """)
    r = build_reward("o", {"type": "python", "function": "my_rewards_mod:ours"})
    np.testing.assert_allclose(score(r, ["a", "b"], ["12345", "x" * 30]), [0.5, 1.0])
    t = build_reward("t", {"type": "python", "function": "my_rewards_mod:trl", "kwargs": {"bonus": 0.25}})
    np.testing.assert_allclose(score(t, ["cat", "dog"], ["a cat", "no"]), [0.75, 0.0])
    f = build_reward("f", {"type": "python", "function": f"{tmp_path / 'my_rewards_mod.py'}:ours"})
    np.testing.assert_allclose(score(f, ["a"], ["12345"]), [0.5])


def test_python_reward_errors(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_rewards_mod2", "def fn(prompts, responses):\n    return [None]\n")
    with pytest.raises(RewardError, match=r"objectives\.o\.function: cannot import module 'no_such_pkg_xyz\.mod'"):
        build_reward("o", {"type": "python", "function": "no_such_pkg_xyz.mod:fn"})
    with pytest.raises(RewardError, match=r"has no attribute 'missing'; callables there: fn"):
        build_reward("o", {"type": "python", "function": "my_rewards_mod2:missing"})
    with pytest.raises(RewardError, match=r"not of the form 'package\.module:function'"):
        build_reward("o", {"type": "python", "function": "my_rewards_mod2.fn"})
    with pytest.raises(RewardError, match=r"file .*nope\.py does not exist"):
        build_reward("o", {"type": "python", "function": f"{tmp_path / 'nope.py'}:fn"})
    r = build_reward("o", {"type": "python", "function": "my_rewards_mod2:fn"})
    with pytest.raises(RewardError, match="returned nan for sample 0"):  # TRL's None = not applicable
        score(r, ["a"], ["b"])


def test_length_reward_matches_formula():
    r = build_reward("len", {"type": "length", "target": 10, "tolerance": 4})
    replies = [" ".join(["word"] * n) for n in (10, 14, 6, 30)] + ["   "]
    expect = [1 / (1 + ((n - 10) / 4) ** 2) for n in (10, 14, 6, 30)] + [0.0]
    np.testing.assert_allclose(score(r, ["p"] * 5, replies), expect)


def test_nontoxic_ranks_insults_low():
    r = build_reward("safe", {"type": "nontoxic"})
    s = score(r, ["I lost my job."] * 3, ["I'm so sorry, that must be hard.", "You are a stupid idiot, shut up.", ""])
    assert s[0] > 0.9 and s[1] < 0.1 and s[2] == 0.0


def test_copy_ratio():
    assert copy_ratio("I feel sad today", "I feel sad today") == 1.0
    assert copy_ratio("I feel sad today", "What a lovely garden you have") == 0.0
    assert copy_ratio("I feel sad today", "You feel sad today") == pytest.approx(1 / 2)  # "feel sad today" of 2
    assert copy_ratio("I feel sad", "") == 0.0
    assert copy_ratio("I feel sad", "sad") == 1.0  # shorter than n: its own length


# ------------------------------------------------------------------------------ NLL map

def test_nll_to_score_maps():
    nll = np.log(np.array([1.0, 5.0, 20.0, 80.0, 1e4]))
    s = nll_to_score(nll, "ratio", ppl0=20.0)
    np.testing.assert_allclose(s, 20 / (20 + np.exp(nll)))
    assert s[2] == pytest.approx(0.5) and np.all(np.diff(s) < 0) and s[-1] > 0
    np.testing.assert_allclose(nll_to_score(nll, "linear", scale=50.0), [0.98, 0.9, 0.6, 0.0, 0.0])
    from emorl.rewards.base import Options
    from emorl.rewards.lm import Perplexity

    r = Perplexity("f", Options("f", {"type": "perplexity", "model": "m", "scale": 50}))  # built, not loaded
    assert r.map == "linear" and r.scale == 50.0  # `scale` alone selects the paper's map


# ------------------------------------------------------------------------------ fluency and perplexity

def _ref_causal_nll(model, ctx: list[int], tgt: list[int]) -> float:
    """Plain reference: one unpadded sequence, full logits, mean NLL of the target tokens."""
    ids = torch.tensor([ctx + tgt])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return -float(np.mean([logp[len(ctx) + j - 1, t].item() for j, t in enumerate(tgt)]))


PROMPTS3 = ["I can't stop worrying about my exams.", "My cat died.", "Nobody listens to me at home, ever."]
REPLIES3 = ["That sounds really stressful; exams can feel overwhelming.", "I'm so sorry.",
            "It must be lonely to feel unheard by your own family, day after day."]


def test_fluency_matches_unbatched_reference(tiny_base):
    from emorl.data import format_prompts

    r = build_reward("fluency", {"type": "fluency", "micro_batch": 2, "ppl0": 30}, base=tiny_base)
    got = score(r, PROMPTS3 + ["x"], REPLIES3 + [" "])
    tok = tiny_base.tokenizer
    texts = format_prompts(tok, PROMPTS3, False, tiny_base.config.system_prompt)
    ref = [_ref_causal_nll(tiny_base.model, tok(t, add_special_tokens=False).input_ids,
                           tok(rep, add_special_tokens=False).input_ids)
           for t, rep in zip(texts, REPLIES3, strict=True)]
    np.testing.assert_allclose(got[:3], [30 / (30 + math.exp(n)) for n in ref], rtol=1e-4)
    assert got[3] == 0.0  # empty reply
    one = np.concatenate([score(r, [p], [q]) for p, q in zip(PROMPTS3, REPLIES3, strict=True)])
    np.testing.assert_allclose(got[:3], one, rtol=1e-4)  # padding and batch composition change nothing


def test_shared_prefix_cache_changes_nothing(tiny_base):
    from emorl.data import format_prompts
    from emorl.rewards.lm import _common_prefix, causal_nll

    tok = tiny_base.tokenizer
    ctx = tok(format_prompts(tok, PROMPTS3 * 2, False, None), add_special_tokens=False)["input_ids"]
    tgt = tok(REPLIES3 * 2, add_special_tokens=False)["input_ids"]
    assert _common_prefix(list(zip(ctx, tgt, strict=True))) >= 8  # the template's default system prompt
    args = (tiny_base.model, ctx, tgt, tok.pad_token_id, "cpu", 4)
    with torch.no_grad():
        np.testing.assert_allclose(causal_nll(*args, share_prefix=True), causal_nll(*args, share_prefix=False),
                                   rtol=1e-5)
    assert _common_prefix([([1, 2, 3], [9]), ([1, 2], [9])]) == 1  # each row keeps a context token of its own


def test_fluency_ignores_trained_adapters(tiny_base):
    from emorl.config import LoraConfig
    from emorl.models import add_adapters

    r = build_reward("fluency", {"type": "fluency"}, base=tiny_base)
    before = score(r, PROMPTS3, REPLIES3)
    model = add_adapters(tiny_base, ["empathy"], LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # make the adapter change the model's outputs
    ids = tiny_base.tokenizer(REPLIES3[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model.get_base_model()(input_ids=ids).logits  # LoRA layers are active here
    with torch.no_grad(), model.disable_adapter():
        plain_logits = model(input_ids=ids).logits
    assert not torch.allclose(base_logits, plain_logits)  # the adapter does change the model
    after = score(r, PROMPTS3, REPLIES3)
    np.testing.assert_allclose(after, before, rtol=1e-5)


def test_fluency_seq2seq_matches_reference(tiny_t5_base):
    from emorl.data import format_prompts

    b = tiny_t5_base
    r = build_reward("fluency", {"type": "fluency", "ppl0": 1000}, base=b)
    got = score(r, PROMPTS3, REPLIES3)
    tok = b.tokenizer
    src = format_prompts(tok, PROMPTS3, True)
    ref = []
    for s, rep in zip(src, REPLIES3, strict=True):
        ids = torch.tensor([tok(s, add_special_tokens=True).input_ids])
        labels = torch.tensor([tok(rep, add_special_tokens=False).input_ids])
        with torch.no_grad():
            ref.append(float(b.model(input_ids=ids, labels=labels).loss))  # HF's own mean token NLL
    np.testing.assert_allclose(got, [1000 / (1000 + math.exp(n)) for n in ref], rtol=1e-4)


def test_fluency_needs_base():
    with pytest.raises(RewardError, match=r"objectives\.flu\.type: reward type 'fluency' scores replies under"):
        build_reward("flu", {"type": "fluency"})


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from emorl.config import ModelConfig
    from emorl.models import load_base

    b = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    d = tmp_path_factory.mktemp("tiny-lm")
    b.model.save_pretrained(d)
    b.tokenizer.save_pretrained(d)
    return str(d)


def test_perplexity_matches_reference_and_shares_model(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    alone = build_reward("ppl", {"type": "perplexity", "model": tiny_lm_dir, "ppl0": 5000, "micro_batch": 2})
    paper = build_reward("ppl2", {"type": "perplexity", "model": tiny_lm_dir, "include_prompt": True, "ppl0": 5000})
    assert alone.model is paper.model  # loaded once per process
    got_alone, got_paper = score(alone, PROMPTS3, REPLIES3), score(paper, PROMPTS3, REPLIES3)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ref_alone, ref_paper = [], []
    for p, rep in zip(PROMPTS3, REPLIES3, strict=True):
        rid = tok(rep, add_special_tokens=False).input_ids
        ctx, tgt = (bos, rid) if bos else (rid[:1], rid[1:])
        ref_alone.append(_ref_causal_nll(ref_model, ctx, tgt))
        ids = tok(p, add_special_tokens=False).input_ids + rid  # the paper: no separator, every token scored
        ref_paper.append(_ref_causal_nll(ref_model, ids[:1], ids[1:]))
    np.testing.assert_allclose(got_alone, [5000 / (5000 + math.exp(n)) for n in ref_alone], rtol=1e-4)
    np.testing.assert_allclose(got_paper, [5000 / (5000 + math.exp(n)) for n in ref_paper], rtol=1e-4)
    assert not np.allclose(got_alone, got_paper)


def test_perplexity_gpt2_architecture_and_full_logits_path(tmp_path, monkeypatch):
    """GPT-2 (learned absolute positions: left padding is only right with explicit position ids), through the
    path for models without ``logits_to_keep`` as well."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from emorl.models import smollm2_tokenizer_dir
    from emorl.rewards import lm

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256)).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    spec = {"type": "perplexity", "model": str(tmp_path), "include_prompt": True, "ppl0": 40000}
    got = score(build_reward("gpt2", spec), PROMPTS3, REPLIES3)
    ref = []
    for p, rep in zip(PROMPTS3, REPLIES3, strict=True):
        ids = tok(p, add_special_tokens=False).input_ids + tok(rep, add_special_tokens=False).input_ids
        with torch.no_grad():
            ref.append(float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss))  # the paper's way
    np.testing.assert_allclose(got, [40000 / (40000 + math.exp(n)) for n in ref], rtol=1e-4)
    monkeypatch.setattr(lm, "_accepts", lambda model, arg: False)
    np.testing.assert_allclose(score(build_reward("gpt2b", spec), PROMPTS3, REPLIES3), got, rtol=1e-5)


def test_perplexity_bad_model_path(tmp_path):
    with pytest.raises(RewardError, match=r"objectives\.ppl\.model: cannot load causal LM"):
        build_reward("ppl", {"type": "perplexity", "model": str(tmp_path / "missing")})


# ------------------------------------------------------------------------------ hf-classifier

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """MiniLM as a 3-label BertForSequenceClassification with a random (seeded) head, saved once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from emorl.rewards.text import default_encoder_path

    torch.manual_seed(0)
    path = default_encoder_path()
    m = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, id2label={0: "low", 1: "mid", 2: "high"}, label2id={"low": 0, "mid": 1, "high": 2})
    d = tmp_path_factory.mktemp("clf")
    m.save_pretrained(d)
    AutoTokenizer.from_pretrained(path).save_pretrained(d)
    return str(d)


def test_hf_classifier_transforms_match_reference(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(classifier_dir)
    ref = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        single = ref(**tok(REPLIES3, padding=True, return_tensors="pt")).logits
        pair = ref(**tok(PROMPTS3, REPLIES3, padding=True, return_tensors="pt")).logits
    cases = [({"transform": "softmax", "label": "high"}, single.softmax(-1)[:, 2]),
             ({"transform": "sigmoid", "label": 1, "pair": True}, pair[:, 1].sigmoid()),
             ({"transform": "clamp", "label": "low", "batch_size": 2}, single[:, 0].clamp(0, 1))]
    for opts, expect in cases:
        r = build_reward("clf", {"type": "hf-classifier", "model": classifier_dir, **opts})
        np.testing.assert_allclose(score(r, PROMPTS3, REPLIES3), expect.numpy(), rtol=1e-4, atol=1e-6)
    assert score(r, ["a"], [""])[0] == 0.0


def test_hf_classifier_label_errors(classifier_dir):
    with pytest.raises(RewardError, match=r"objectives\.clf\.label: 'top' is not a label.*0=low, 1=mid, 2=high"):
        build_reward("clf", {"type": "hf-classifier", "model": classifier_dir, "label": "top"})
    with pytest.raises(RewardError, match=r"objectives\.clf\.label: .* has 3 labels"):
        build_reward("clf", {"type": "hf-classifier", "model": classifier_dir})
    with pytest.raises(RewardError, match=r"index 5 is out of range"):
        build_reward("clf", {"type": "hf-classifier", "model": classifier_dir, "label": 5})
    with pytest.raises(RewardError, match=r"objectives\.clf\.model: cannot load sequence classifier"):
        build_reward("clf", {"type": "hf-classifier", "model": classifier_dir + "-missing"})


# ------------------------------------------------------------------------------ MiniLM proxies

def test_encoder_matches_sentence_transformers(minilm_rewards):
    from sentence_transformers import SentenceTransformer

    enc = minilm_rewards["reflection"].encoder
    st = SentenceTransformer(enc.path, device="cpu")
    texts = STATEMENTS + REFLECTIVE + ["", "a " * 400]  # empty and over-long texts too
    np.testing.assert_allclose(enc.encode(texts).numpy(), st.encode(texts, normalize_embeddings=True), atol=2e-5)


def test_minilm_loaded_once(minilm_rewards):
    assert minilm_rewards["reflection"].encoder is minilm_rewards["empathy"].encoder
    again = build_reward("refl2", {"type": "reflection", "center": 0.2})
    assert again.encoder is minilm_rewards["reflection"].encoder


def test_reflection_ranks_reflective_above_off_topic_and_copies(minilm_rewards):
    r = minilm_rewards["reflection"]
    good, off = score(r, STATEMENTS, REFLECTIVE), score(r, STATEMENTS, OFF_TOPIC)
    copy = score(r, STATEMENTS, STATEMENTS)
    assert np.all(good > off + 0.5), (good, off)
    assert np.all(good > copy + 0.5), (good, copy)
    assert score(r, ["I feel sad"], [""])[0] == 0.0


def test_empathy_ranks_empathic_above_dismissive(minilm_rewards):
    r = minilm_rewards["empathy"]
    good, bad = score(r, STATEMENTS, EMPATHIC), score(r, STATEMENTS, DISMISSIVE)
    assert np.all(good > bad + 0.3), (good, bad)
    assert good.min() > bad.max()  # every empathic reply above every dismissive one, across statements


@pytest.mark.slow
def test_fluency_ranks_fluent_above_word_salad(smollm2_base):
    r = build_reward("fluency", {"type": "fluency"}, base=smollm2_base)
    fluent = score(r, STATEMENTS * 2, REFLECTIVE + EMPATHIC)
    salad = score(r, STATEMENTS, WORD_SALAD)
    assert fluent.min() > salad.max() + 0.2, (fluent, salad)


# ------------------------------------------------------------------------------ held-out judges (eval.judges)

def test_heldout_banks_are_written_apart_from_the_training_banks():
    from emorl.rewards import banks, banks_heldout

    train = {s.lower() for s in banks.EMPATHIC + banks.DISMISSIVE}
    assert not train & {s.lower() for s in banks_heldout.EMPATHIC + banks_heldout.DISMISSIVE}
    assert len(banks_heldout.EMPATHIC) >= 20 and len(banks_heldout.DISMISSIVE) >= 20


def test_empathy_heldout_ranks_empathic_above_dismissive_with_its_own_banks():
    from emorl.rewards import banks_heldout

    r = build_reward("empathy_judge", {"type": "empathy-heldout"})
    assert r.empathic == list(banks_heldout.EMPATHIC) and r.dismissive == list(banks_heldout.DISMISSIVE)
    good, bad = score(r, STATEMENTS, EMPATHIC), score(r, STATEMENTS, DISMISSIVE)
    assert np.all(good > bad + 0.3), (good, bad)  # measured: smallest margin 0.45 (docs/rewards.md)
    mine = build_reward("empathy_judge", {"type": "empathy-heldout", "empathic": ["Hello."]})
    assert mine.empathic == ["Hello."]  # a list given in the spec is kept


def test_reflection_pmi_equals_a_direct_computation(tiny_base):
    from emorl.rewards.heldout import CONTEXT, NEUTRAL

    r = build_reward("reflection_judge", {"type": "reflection-pmi"}, base=tiny_base)
    tok, model = tiny_base.tokenizer, tiny_base.model

    def mean_logp(context: str, reply: str) -> float:
        c = tok(context, add_special_tokens=False)["input_ids"]
        t = tok(" " + reply, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + t])).logits[0].float()
        lp = torch.log_softmax(logits[len(c) - 1:-1], -1)
        return float(lp[torch.arange(len(t)), torch.tensor(t)].mean())

    prompts, replies = STATEMENTS[:3], REFLECTIVE[:2] + ["completely unrelated words here"]
    want = [mean_logp(CONTEXT.format(statement=p), y) - mean_logp(NEUTRAL, y) for p, y in zip(prompts, replies,
                                                                                               strict=True)]
    np.testing.assert_allclose(r.pmi(prompts, replies), want, atol=1e-4)
    assert score(r, STATEMENTS[:1], [STATEMENTS[0]])[0] == 0.0  # a verbatim copy scores 0 (copy penalty)


@pytest.mark.slow
def test_reflection_pmi_ranks_reflective_above_off_topic(smollm2_base):
    r = build_reward("reflection_judge", {"type": "reflection-pmi"}, base=smollm2_base)
    good, off = score(r, STATEMENTS, REFLECTIVE), score(r, STATEMENTS, OFF_TOPIC)
    assert np.all(good > off + 0.3), (good, off)  # measured: smallest margin 0.38 (docs/rewards.md)

"""EnsembleModel.generate against plainly written references: K separately merged model copies with a full
recompute of the prefix at every step (the reference implementation's shape, with per-row EOS), peft's own
single-adapter generate, and explicitly merged weights for ``params``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from emorl.config import LoraConfig, ModelConfig
from emorl.data import encode_prompts, format_prompts
from emorl.ensemble import EnsembleModel, check_weights
from emorl.models import Base, add_adapters, load_base
from emorl.utils import EmorlError

NAMES = ["ref", "emp", "flu"]
PROMPTS = ["I lost my job today.", "My cat is sick.", "Nobody calls me anymore and the evenings are long.",
           "I failed the exam again."]
POINTS = [[0.8, 0.5, 0.1], [0.2, 0.9, 0.4], [0.3, 0.0, 0.7], [1.0, 1.0, 1.0]]
T = 6


def make_ensemble(name: str, std: float = 0.3) -> EnsembleModel:
    base = load_base(ModelConfig(name=name, system_prompt=None))
    add_adapters(base, NAMES, LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0 (a no-op adapter); make each adapter different
                p.normal_(0.0, std, generator=g)
    return EnsembleModel(base)


@pytest.fixture(scope="module")
def llama() -> EnsembleModel:
    return make_ensemble("tiny-llama")


@pytest.fixture(scope="module")
def t5() -> EnsembleModel:
    return make_ensemble("tiny-t5")


@pytest.fixture(params=["llama", "t5"])
def ens(request: pytest.FixtureRequest) -> EnsembleModel:
    return request.getfixturevalue(request.param)


@pytest.fixture
def eos_override(llama: EnsembleModel) -> Iterator[EnsembleModel]:
    old = list(llama.eos)
    yield llama
    llama.eos = old


# ------------------------------------------------------------------------------------------ naive reference

_MERGED: dict[int, list[torch.nn.Module]] = {}


def merged_copies(base: Base) -> list[torch.nn.Module]:
    """K + 1 separate plain models: adapter i merged into a deep copy of the base (the reference's K copies), and
    last the base itself with every adapter removed (the anchor of base-anchored mixing)."""
    if id(base) in _MERGED:
        return _MERGED[id(base)]
    out = _MERGED.setdefault(id(base), [])
    for n in NAMES:
        c = copy.deepcopy(base.model)
        c.set_adapter(n)
        out.append(c.merge_and_unload(adapter_names=[n]).eval())
    out.append(copy.deepcopy(base.model).unload().eval())
    return out


def naive_decode(ens: EnsembleModel, models: list[torch.nn.Module], weights: list[float], mode: str,
                 t_max: int = T, anchored: bool = True) -> torch.Tensor:
    """Greedy, no cache: every step runs each of the K + 1 models on the whole prefix, mixes, appends the token.
    ``anchored``: x_0 + sum_k w_k (x_k - x_0) with x_0 the base's hidden state / log-probs; else sum_k w_k x_k."""
    base = ens.base
    s2s = base.is_seq2seq
    enc = encode_prompts(base.tokenizer, format_prompts(base.tokenizer, PROMPTS, s2s, None), 128, s2s)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[0]
    gen = torch.zeros(n, 0, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(t_max):
            hs, zs = [], []
            for m in models:
                if s2s:
                    dec = torch.cat([torch.full((n, 1), m.config.decoder_start_token_id), gen], dim=1)
                    out = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
                    hs.append(out.decoder_hidden_states[-1][:, -1])
                else:
                    seq = torch.cat([ids, gen], dim=1)
                    msk = torch.cat([mask, torch.ones_like(gen)], dim=1)
                    pos = msk.cumsum(-1) - 1
                    pos.masked_fill_(msk == 0, 1)
                    out = m(input_ids=seq, attention_mask=msk, position_ids=pos, output_hidden_states=True)
                    hs.append(out.hidden_states[-1][:, -1])
                zs.append(out.logits[:, -1])
            (h0, *hs), (z0, *zs) = [hs[-1], *hs[:-1]], [zs[-1], *zs[:-1]]
            anchor = anchored and mode != "probs"
            if mode == "hidden":
                mixed = sum(w * (h - h0 if anchor else h) for w, h in zip(weights, hs, strict=True))
                mixed = mixed + h0 if anchor else mixed
                scale = models[0].config.d_model ** -0.5 if s2s else 1.0
                scores = models[0].lm_head(mixed * scale)
            elif mode == "logits":
                l0 = torch.log_softmax(z0, -1)
                scores = sum(w * (torch.log_softmax(z, -1) - (l0 if anchor else 0)) for w, z in
                             zip(weights, zs, strict=True)) + (l0 if anchor else 0)
            else:
                scores = torch.log(sum(w * torch.softmax(z, -1) for w, z in zip(weights, zs, strict=True)))
            nxt = scores.argmax(-1)
            nxt[finished] = ens.pad
            gen = torch.cat([gen, nxt[:, None]], dim=1)
            finished |= torch.isin(nxt, torch.tensor(ens.eos))
    return gen


def peft_generate(ens: EnsembleModel, name: str, t_max: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's own generate() with one adapter active: (tokens, per-step logits)."""
    base = ens.base
    enc = encode_prompts(base.tokenizer, format_prompts(base.tokenizer, PROMPTS, base.is_seq2seq, None), 128,
                         base.is_seq2seq)
    base.model.set_adapter(name)
    with torch.no_grad():
        out = base.model.generate(**enc, max_new_tokens=t_max, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=ens.pad)
    base.model.set_adapter(NAMES[0])
    toks = out.sequences[:, -len(out.logits):]
    return toks, torch.stack(out.logits, dim=1)


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("mode", ["hidden", "logits", "params"])
def test_one_hot_reproduces_the_adapter(ens: EnsembleModel, mode: str) -> None:
    for i, name in enumerate(NAMES):
        w = [0.0] * 3
        w[i] = 1.0
        res = ens.generate(PROMPTS, w, mode=mode, max_new_tokens=T, output_scores=True)
        toks, logits = peft_generate(ens, name)
        assert torch.equal(res.token_ids[:, : toks.shape[1]], toks), f"{mode}, adapter {name}"
        got = res.scores[0][:, : logits.shape[1]]
        ref = torch.log_softmax(logits, -1) if mode == "logits" else logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["hidden", "logits", "probs"])
def test_fast_decoder_equals_naive_reference(ens: EnsembleModel, mode: str) -> None:
    models = merged_copies(ens.base)
    res = ens.generate(PROMPTS, POINTS, mode=mode, max_new_tokens=T)
    one_hot = ens.generate(PROMPTS, np.eye(3), mode=mode, max_new_tokens=T).token_ids
    for g, w in enumerate(POINTS):
        assert torch.equal(res.token_ids[g], naive_decode(ens, models, w, mode)), f"point {w}"
    # the mixing must matter, or this test proves little
    assert any(not torch.equal(res.token_ids[g], one_hot[i]) for g in range(len(POINTS)) for i in range(3))
    assert not all(torch.equal(res.token_ids[0], one_hot[i]) for i in range(3))


def test_logits_and_hidden_agree(ens: EnsembleModel) -> None:
    """A shared bias-free linear head (T5 scaling included): lm_head(sum w h) = sum w z, and sum w log_softmax(z)
    differs from it by a per-row constant, so both the argmax and the sampled distribution coincide."""
    h = ens.generate(PROMPTS, POINTS, mode="hidden", max_new_tokens=T, output_scores=True)
    lg = ens.generate(PROMPTS, POINTS, mode="logits", max_new_tokens=T, output_scores=True)
    assert torch.equal(h.token_ids, lg.token_ids)
    torch.testing.assert_close(torch.log_softmax(h.scores, -1), torch.log_softmax(lg.scores, -1), rtol=1e-4,
                               atol=1e-4)
    hs = ens.generate(PROMPTS, POINTS, mode="hidden", max_new_tokens=T, do_sample=True, seed=3)
    ls = ens.generate(PROMPTS, POINTS, mode="logits", max_new_tokens=T, do_sample=True, seed=3)
    # the same distributions up to float rounding (~1e-6): the inverse-CDF sampler can flip a draw that lands on a
    # boundary between two tokens (seen on some CPUs), after which that row's continuation differs
    same_rows = [torch.equal(a, b) for a, b in zip(hs.token_ids.flatten(0, 1), ls.token_ids.flatten(0, 1),
                                                   strict=True)]
    assert sum(same_rows) >= 0.8 * len(same_rows), same_rows


def test_params_equals_explicit_merged_weights(ens: EnsembleModel) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = ens.base
    w = POINTS[0]
    res = ens.generate(PROMPTS, w, mode="params", max_new_tokens=T, output_scores=True)
    merged = copy.deepcopy(base.model)
    with torch.no_grad():
        for mod in merged.modules():
            if isinstance(mod, LoraLinear):
                mod.base_layer.weight += sum(wk * mod.scaling[n] * (mod.lora_B[n].weight @ mod.lora_A[n].weight)
                                             for wk, n in zip(w, NAMES, strict=True))
    plain = merged.unload()
    enc = encode_prompts(base.tokenizer, format_prompts(base.tokenizer, PROMPTS, base.is_seq2seq, None), 128,
                         base.is_seq2seq)
    with torch.no_grad():
        out = plain.generate(**enc, max_new_tokens=T, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=ens.pad)
    toks = out.sequences[:, -len(out.logits):]
    assert torch.equal(res.token_ids[:, : toks.shape[1]], toks)
    torch.testing.assert_close(res.scores[0][:, : toks.shape[1]], torch.stack(out.logits, 1), rtol=1e-4, atol=1e-4)
    hidden = ens.generate(PROMPTS, w, mode="hidden", max_new_tokens=T)
    assert not torch.equal(hidden.token_ids, res.token_ids), "params and hidden mixing should differ here"


@pytest.mark.parametrize("mode", ["hidden", "probs", "params"])
def test_points_together_equal_points_alone(ens: EnsembleModel, mode: str) -> None:
    together = ens.generate(PROMPTS, POINTS, mode=mode, max_new_tokens=T)
    chunked = ens.generate(PROMPTS, POINTS, mode=mode, max_new_tokens=T, max_rows=5)  # prompt blocks + chunks
    assert chunked.stats["chunks"] > 2
    for g, w in enumerate(POINTS):
        alone = ens.generate(PROMPTS, w, mode=mode, max_new_tokens=T)
        assert torch.equal(together.token_ids[g], alone.token_ids)
        assert together.texts[g] == alone.texts
    assert torch.equal(together.token_ids, chunked.token_ids)
    sampled = ens.generate(PROMPTS, POINTS, mode=mode, max_new_tokens=T, do_sample=True, seed=7, top_k=50)
    for g in (0, 3):
        alone = ens.generate(PROMPTS, POINTS[g], mode=mode, max_new_tokens=T, do_sample=True, seed=7, top_k=50)
        assert torch.equal(sampled.token_ids[g], alone.token_ids)


def test_sampling_is_seeded_and_uses_the_warpers(llama: EnsembleModel) -> None:
    kw = {"max_new_tokens": T, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
    a = llama.generate(PROMPTS, POINTS, seed=1, **kw)
    b = llama.generate(PROMPTS, POINTS, seed=1, **kw)
    c = llama.generate(PROMPTS, POINTS, seed=2, **kw)
    assert torch.equal(a.token_ids, b.token_ids)
    assert not torch.equal(a.token_ids, c.token_ids)
    # top_k=1 keeps only the argmax: sampling must then equal greedy decoding
    k1 = llama.generate(PROMPTS, POINTS, seed=1, max_new_tokens=T, do_sample=True, top_k=1)
    assert torch.equal(k1.token_ids, llama.generate(PROMPTS, POINTS, max_new_tokens=T).token_ids)


def test_sampler_frequencies_match_the_softmax_of_the_warped_logits() -> None:
    """The decoder's token choice (emorl.sampling.choose on transformers' warpers, also the trainer's
    UniformSampler) draws tokens with the probabilities of the warped distribution, computed here by hand."""
    from emorl.sampling import UniformSampler, choose, warpers

    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 1.0, 0.0, -2.0, 0.8])
    # by hand: temperature 0.7; top-k 5 keeps tokens {0, 1, 4, 7, 2}; their probabilities 0.501, 0.245, 0.120,
    # 0.090, 0.044 reach top-p 0.9 at token 7 (cumulative 0.956), so token 2 is dropped too
    z = logits.double() / 0.7
    keep = torch.tensor([0, 1, 4, 7])
    expected = torch.zeros(8, dtype=torch.float64)
    expected[keep] = torch.softmax(z[keep], 0)
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    rows = logits.expand(n, 8).clone()
    warped = warpers(0.7, 5, 0.9)(torch.zeros(n, 1, dtype=torch.long), rows)
    tok = choose(warped, u)
    sampler = UniformSampler(u[:, None], temperature=0.7, top_k=5, top_p=0.9)
    assert torch.equal(sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 8).clone()).argmax(-1), tok)
    freq = torch.bincount(tok, minlength=8).double() / n
    assert freq[[2, 3, 5, 6]].sum() == 0  # warped-away tokens are never drawn
    tv = 0.5 * (freq - expected).abs().sum()
    assert tv < 0.01, (freq, expected)  # the sampling noise is ~0.003 at 40k draws
    chi2 = float((n * (freq[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 16.3, chi2  # 3 degrees of freedom: p = 0.001


def test_sampled_points_share_random_numbers(llama: EnsembleModel) -> None:
    """Common random numbers: a normalised hidden mix samples the same tokens for w and c*w, and a one-hot point
    samples exactly what its adapter alone samples with the same seed, whatever else shares the call."""
    kw = {"max_new_tokens": T, "do_sample": True, "seed": 3}
    res = llama.generate(PROMPTS, [[0.2, 0.5, 0.3], [0.4, 1.0, 0.6], [1.0, 0.0, 0.0]], anchor="none", **kw)
    assert torch.equal(res.token_ids[0], res.token_ids[1])
    alone = llama.generate(PROMPTS, [1.0, 0.0, 0.0], **kw)
    assert torch.equal(res.token_ids[2], alone.token_ids)


def test_rows_that_end_early_stay_ended(eos_override: EnsembleModel) -> None:
    ens = eos_override
    t_max = 8
    free = ens.generate(PROMPTS, POINTS, max_new_tokens=t_max).token_ids  # (G, B, T), no EOS in sight
    # make a token that some rows emit mid-way (and others never) the end-of-sequence token
    flat = free.reshape(-1, t_max)
    candidates = [int(t) for t in torch.unique(flat[:, 1:])
                  if (flat[:, 0] != t).all() and 0 < int((flat == t).any(1).sum()) < flat.shape[0] // 2]
    assert candidates, "the tiny model should emit some token mid-sequence in a few rows"
    ens.eos = [candidates[0]]
    res = ens.generate(PROMPTS, POINTS, max_new_tokens=t_max)
    small = ens.generate(PROMPTS, POINTS, max_new_tokens=t_max, max_rows=8)  # chunks of 2 pairs: drops happen
    assert small.stats.get("regroups", 0) > 0, "finished rows should have been dropped from the batch"
    assert torch.equal(small.token_ids, res.token_ids)
    models = merged_copies(ens.base)
    for g, w in enumerate(POINTS):
        assert torch.equal(res.token_ids[g], naive_decode(ens, models, w, "hidden", t_max))
    ended = (res.lengths < t_max).sum()
    assert 0 < ended < res.lengths.numel()
    for g in range(len(POINTS)):
        for b in range(len(PROMPTS)):
            n = int(res.lengths[g, b])
            row = res.token_ids[g, b]
            if n < t_max:
                assert int(row[n - 1]) == candidates[0] and (row[n:] == ens.pad).all()
            assert torch.equal(row[:n], free[g, b, :n])  # identical up to the end: ending changes nothing before


def test_stop_strings_end_rows_and_cut_text(llama: EnsembleModel) -> None:
    free = llama.generate(PROMPTS, POINTS[0], max_new_tokens=T)
    piece = llama.tokenizer.decode(free.token_ids[0, 2:3])
    res = llama.generate(PROMPTS, POINTS[0], max_new_tokens=T, stop=[piece])
    assert int(res.lengths[0]) <= 3
    assert piece not in res.texts[0]
    assert free.texts[0].startswith(res.texts[0].strip()[:5])


def test_greedy_hidden_mixing_is_scale_invariant_only_when_convex(llama: EnsembleModel) -> None:
    """Greedy, sum_k w_k h_k and c * sum_k w_k h_k pick the same tokens: the convex rule decodes w / sum(w), and a
    raw (unanchored) reference with the scaled weights agrees. Anchored mixing is not scale invariant."""
    models = merged_copies(llama.base)
    a = llama.generate(PROMPTS, POINTS[:2], max_new_tokens=T, anchor="none")
    b = llama.generate(PROMPTS, (2.5 * np.array(POINTS[:2])).tolist(), max_new_tokens=T, anchor="none")
    assert torch.equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.weights.sum(1), 1.0)
    for g, w in enumerate(POINTS[:2]):
        raw = naive_decode(llama, models, (2.5 * np.array(w)).tolist(), "hidden", anchored=False)
        assert torch.equal(a.token_ids[g], raw)
    anchored = llama.generate(PROMPTS, (2.5 * np.array(POINTS[:2])).tolist(), max_new_tokens=T)
    assert not torch.equal(anchored.token_ids, a.token_ids)


def test_bad_weights_and_inputs_are_refused(llama: EnsembleModel) -> None:
    cases = [([1.0, 0.5], "needs 3 weights"), ([1.0, float("nan"), 0.0], "NaN"), ([1.0, -0.1, 0.0], ">= 0"),
             ("abc", "expected numbers"), ([[[1, 2, 3]]], "vector of 3 or a G×3 matrix")]
    for w, msg in cases:
        for mode, anchor in (("hidden", "base"), ("hidden", "none"), ("params", "base"), ("probs", "base")):
            with pytest.raises(EmorlError, match=msg):
                llama.generate(PROMPTS, w, mode=mode, anchor=anchor)
    for mode, anchor in (("hidden", "none"), ("logits", "none"), ("params", "none"), ("probs", "base")):
        with pytest.raises(EmorlError, match=r"weights\[1\] is all zero"):  # convex: no direction to decode
            llama.generate(PROMPTS, [[1, 1, 1], [0, 0, 0]], mode=mode, anchor=anchor)
    with pytest.raises(EmorlError, match="anchor='middle'"):
        llama.generate(PROMPTS, POINTS[0], anchor="middle")
    with pytest.raises(EmorlError, match="mode='soup'"):
        llama.generate(PROMPTS, POINTS[0], mode="soup")
    with pytest.raises(EmorlError, match=r"prompts\[1\] is empty"):
        llama.generate(["hi", " "], POINTS[0])
    with pytest.raises(EmorlError, match="temperature must be > 0"):
        llama.generate(PROMPTS, POINTS[0], do_sample=True, temperature=0)
    w, single = check_weights([[1, 3, 0]], 3, normalize=True)
    assert not single and np.allclose(w, [[0.25, 0.75, 0.0]])


def test_result_shapes_and_records(llama: EnsembleModel) -> None:
    one = llama.generate(PROMPTS[:2], POINTS[0], max_new_tokens=3)
    assert len(one.texts) == 2 and isinstance(one.texts[0], str) and one.token_ids.shape == (2, 3)
    many = llama.generate(PROMPTS[:2], POINTS[:3], max_new_tokens=3)
    assert len(many.texts) == 3 and len(many.texts[0]) == 2 and many.token_ids.shape == (3, 2, 3)
    recs = many.records()
    assert len(recs) == 6 and recs[0]["weights"] == dict(zip(NAMES, POINTS[0], strict=True))


def test_preallocated_cache_equals_growing_cache(ens: EnsembleModel) -> None:
    fast = ens.generate(PROMPTS, POINTS, mode="hidden", max_new_tokens=T, max_rows=6)
    ens.preallocate = False
    try:
        plain = ens.generate(PROMPTS, POINTS, mode="hidden", max_new_tokens=T, max_rows=6)
    finally:
        ens.preallocate = True
    assert torch.equal(fast.token_ids, plain.token_ids)


def _other_arch(kind: str) -> EnsembleModel:
    """GPT-2 (absolute positions, Conv1D) and Qwen2 (q/k/v biases) built from configs with the SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from emorl.models import fingerprint

    ref = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    torch.manual_seed(0)
    v = len(ref.tokenizer)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=2))
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=2))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.eval()
    base = Base(model=model, tokenizer=ref.tokenizer, name=f"tiny-{kind}", is_seq2seq=False,
                device=torch.device("cpu"), fingerprint=fingerprint(model), config=ref.config)
    add_adapters(base, NAMES, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    return EnsembleModel(base)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_other_causal_architectures(kind: str) -> None:
    ens = _other_arch(kind)
    toks, _ = peft_generate(ens, NAMES[1])
    assert torch.equal(ens.generate(PROMPTS, [0, 1, 0], max_new_tokens=T).token_ids[:, : toks.shape[1]], toks)
    models = merged_copies(ens.base)
    res = ens.generate(PROMPTS, POINTS[:2], mode="hidden", max_new_tokens=T)
    for g, w in enumerate(POINTS[:2]):
        assert torch.equal(res.token_ids[g], naive_decode(ens, models, w, "hidden"))


def test_points_sharing_a_prefix_share_rows(llama: EnsembleModel) -> None:
    """Scale-equivalent points give the same greedy tokens, so their rows stay shared the whole way: the backbone
    runs once for the three (and the result equals each point decoded alone)."""
    res = llama.generate(PROMPTS, [[0.2, 0.5, 0.3], [0.4, 1.0, 0.6], [2.0, 5.0, 3.0]], max_new_tokens=T,
                         anchor="none")
    assert torch.equal(res.token_ids[0], res.token_ids[1]) and torch.equal(res.token_ids[0], res.token_ids[2])
    assert res.stats["row_steps"] * 3 == res.stats["row_steps_unshared"]
    mixed = llama.generate(PROMPTS, POINTS, max_new_tokens=T)
    assert mixed.stats["regroups"] > 0 and mixed.stats["row_steps"] < mixed.stats["row_steps_unshared"]

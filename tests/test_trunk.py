"""Adapters on chosen layers (``lora.layers``) and the shared trunk below them.

By hand: with adapters on layers {2, 3} and {1, 3} of a 4-layer model, layer 0 carries no LoRA delta, so all K + 1
streams compute the same hidden states and KV there. The ensemble runs layer 0 once per row group and copies its
output into the streams at layer 1: the replies must equal, token for token, those of running every stream through
every layer (``share_trunk = False``), and the mixing must still be the plain reference's (K + 1 merged copies,
full recompute per step)."""

from __future__ import annotations

import copy

import pytest
import torch

from emorl.config import LoraConfig, ModelConfig, load_config
from emorl.data import encode_prompts, format_prompts
from emorl.ensemble import EnsembleModel
from emorl.layer_spec import adapted_layers, check_layer_spec, layer_stack, resolve_layers
from emorl.lora_bank import lora_bank
from emorl.models import AdapterInfo, add_adapters, load_base, save_adapter
from emorl.utils import EmorlError

PROMPTS = ["I lost my job today.", "My cat is sick.", "Nobody calls me anymore and the evenings are long."]
LAYERS = {"p": "top:2", "q": [1, 3]}  # different layer sets: the trunk is layer 0 (below q's lowest, 1)
POINTS = [[0.8, 0.5], [0.2, 0.9], [1.0, 0.0], [0.0, 0.0], [1.3, 0.4]]
T = 6


def make(name: str, layers: dict[str, object] = LAYERS) -> EnsembleModel:
    base = load_base(ModelConfig(name=name, system_prompt=None, tiny_layers=4))
    for n, spec in layers.items():
        add_adapters(base, [n], LoraConfig(r=4, alpha=8, dropout=0.0, layers=spec))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:  # peft starts B at 0 (a no-op adapter); make each adapter different
                p.normal_(0.0, 0.3, generator=g)
    return EnsembleModel(base, None, require_metadata=False)


@pytest.fixture(scope="module")
def llama() -> EnsembleModel:
    return make("tiny-llama")


@pytest.fixture(scope="module")
def t5() -> EnsembleModel:
    return make("tiny-t5")


@pytest.fixture(params=["llama", "t5"])
def ens(request: pytest.FixtureRequest) -> EnsembleModel:
    return request.getfixturevalue(request.param)


def rows_per_layer(ens: EnsembleModel) -> tuple[list[tuple[int, int]], list]:
    """Record how many rows each decoder layer computes (the rows of its output)."""
    ens.verify_head()  # its one-row check forward is not part of what is counted
    seen: list[tuple[int, int]] = []

    def hook(i: int):
        return lambda mod, args, out: seen.append((i, (out[0] if isinstance(out, tuple) else out).shape[0]))

    return seen, [layer.register_forward_hook(hook(i)) for i, layer in enumerate(ens.stream.layers)]


# ------------------------------------------------------------------------------------------ lora.layers

def test_layer_specs_resolve_to_decoder_layers(ens: EnsembleModel) -> None:
    lm = ens.lm
    assert len(layer_stack(lm)[1]) == 4
    assert resolve_layers("all", lm) is None
    assert resolve_layers("top:2", lm) == [2, 3]
    assert resolve_layers("top:1/4", lm) == [3]
    assert resolve_layers("top:1/2", lm) == [2, 3]
    assert resolve_layers([3, 0], lm) == [0, 3]
    assert adapted_layers(lm, "p") == [2, 3]
    assert adapted_layers(lm, "q") == [1, 3]
    assert ens.trunk(["p", "q", "__base__"]) == 1
    assert ens.trunk(["p"]) == 2
    # seq2seq: the layers are decoder blocks; the encoder carries no adapter
    assert not any("encoder" in n and "lora_A" in n for n, _ in ens.model.named_parameters())


@pytest.mark.parametrize("spec", ["top:0", "bottom:3", "top:3/2", "2", [], [-1], [1, 1], [True], 3.5])
def test_malformed_layer_specs_are_refused_naming_the_field(spec: object) -> None:
    with pytest.raises(EmorlError, match="lora.layers"):
        check_layer_spec(spec)


def test_a_layer_outside_the_model_is_refused_before_any_work() -> None:
    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None, tiny_layers=4))
    for spec, where in (([4], r"layers \[4\] are outside the model's 4 decoder layers"),
                        ("top:5", "has 4 decoder layers")):
        with pytest.raises(EmorlError, match=f"lora.layers.*{where}"):
            add_adapters(base, ["p"], LoraConfig(layers=spec))
    with pytest.raises(EmorlError, match="lora.layers"):
        load_config("tiny", ["lora.layers=top:x"])
    assert load_config("tiny", ["lora.layers=top:1"]).lora.layers == "top:1"


def test_a_top_layer_adapter_loads_in_plain_peft_with_the_same_logits(tmp_path) -> None:
    from peft import PeftModel

    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None, tiny_layers=4))
    plain = copy.deepcopy(base.model)
    add_adapters(base, ["p"], LoraConfig(r=4, alpha=8, dropout=0.0, layers="top:2"))
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    folder = save_adapter(base.model, "p", tmp_path / "p", AdapterInfo(objective="p"))
    loaded = PeftModel.from_pretrained(plain, str(folder)).eval()
    assert adapted_layers(loaded.get_base_model(), "default") == [2, 3]
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        want = base.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            without = loaded(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(without, want)  # the adapter matters


# ------------------------------------------------------------------------------------------ shared trunk

@pytest.mark.parametrize("mode", ["hidden", "logits", "probs"])
@pytest.mark.parametrize("sampled", [False, True])
def test_shared_trunk_equals_every_stream_through_every_layer(ens: EnsembleModel, mode: str, sampled: bool) -> None:
    points = [p for p in POINTS if sum(p) > 0] if mode == "probs" else POINTS
    kw = {"max_new_tokens": T, "do_sample": sampled, "seed": 7, "top_k": 20 if sampled else 0}
    seen, handles = rows_per_layer(ens)
    try:
        ens.share_trunk = True
        shared = ens.generate(PROMPTS, points, mode, **kw)
        first_step = dict(seen[:4])
        seen.clear()
        ens.share_trunk = False
        every = ens.generate(PROMPTS, points, mode, **kw)
        first_step_every = dict(seen[:4])
    finally:
        ens.share_trunk = True
        for h in handles:
            h.remove()
    assert torch.equal(shared.token_ids, every.token_ids)
    assert torch.equal(shared.lengths, every.lengths)
    streams = 3 if mode != "probs" else 2  # p, q (+ the base stream: some anchored point does not sum to 1)
    assert shared.stats["trunk_layers"] == 1
    n = len(PROMPTS)
    assert first_step[0] == n and first_step[1] == streams * n  # the trunk ran once per prompt, then fanned out
    assert first_step_every[0] == streams * n


def test_shared_trunk_mixes_like_the_plain_reference(llama: EnsembleModel) -> None:
    """Adapters on different layer sets, base-anchored hidden mixing, against K + 1 merged model copies that
    recompute the whole prefix every step (no cache, no bank, no trunk)."""
    ens = llama
    models = []
    for n in LAYERS:
        c = copy.deepcopy(ens.base.model)
        c.set_adapter(n)
        models.append(c.merge_and_unload(adapter_names=[n]).eval())
    models.append(copy.deepcopy(ens.base.model).unload().eval())
    tok = ens.tokenizer
    enc = encode_prompts(tok, format_prompts(tok, PROMPTS, False, None), 128, False)
    res = ens.generate(PROMPTS, POINTS, "hidden", max_new_tokens=T)
    for g, w in enumerate(POINTS):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            for _ in range(T):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                hs = [m(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
                      .hidden_states[-1][:, -1] for m in models]
                h0 = hs[-1]
                mixed = h0 + sum(wk * (h - h0) for wk, h in zip(w, hs[:-1], strict=True))
                nxt = models[0].lm_head(mixed).argmax(-1)
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        want = ids[:, -T:]
        got = res.token_ids[g]
        for b in range(len(PROMPTS)):  # compare up to EOS (the ensemble pads after it)
            n = int(res.lengths[g, b])
            assert torch.equal(got[b, :n], want[b, :n]), f"point {w}, prompt {b}"
    assert not torch.equal(res.token_ids[0], res.token_ids[1])  # the weights matter


def peft_generate(ens: EnsembleModel, name: str | None) -> torch.Tensor:
    """peft's own greedy generate() with one adapter active (None: adapters disabled)."""
    base = ens.base
    s2s = base.is_seq2seq
    enc = encode_prompts(base.tokenizer, format_prompts(base.tokenizer, PROMPTS, s2s, None), 128, s2s)
    with torch.no_grad():
        if name is None:
            with base.model.disable_adapter():
                out = base.model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=ens.pad)
        else:
            base.model.set_adapter(name)
            out = base.model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=ens.pad)
    return out[:, -T:] if not s2s else out[:, 1:]


def test_one_hot_is_the_adapter_alone_and_zero_is_the_base(ens: EnsembleModel) -> None:
    res = ens.generate(PROMPTS, [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "hidden", max_new_tokens=T)
    assert res.stats["trunk_layers"] == 1
    for g, name in enumerate(["p", "q", None]):
        want = peft_generate(ens, name)
        assert torch.equal(res.token_ids[g][:, : want.shape[1]], want), f"point {g} ({name or 'base'})"
    assert not torch.equal(res.token_ids[0], res.token_ids[2])


def test_pairs_share_the_trunk_too(llama: EnsembleModel) -> None:
    from emorl.ensemble.pairs import PairSpec, generate_pairs

    texts = [str(t) for t in format_prompts(llama.tokenizer, PROMPTS, False, None)]
    pairs = [PairSpec(t, w, max_new_tokens=T, do_sample=i % 2 == 0, seed=i, row=0)
             for i, (t, w) in enumerate(zip(texts * 2, POINTS[:2] * 3, strict=False))]
    llama.share_trunk = True
    shared = generate_pairs(llama, ["p", "q"], "hidden", pairs, anchored=True)
    llama.share_trunk = False
    try:
        every = generate_pairs(llama, ["p", "q"], "hidden", pairs, anchored=True)
    finally:
        llama.share_trunk = True
    assert [r.token_ids for r in shared] == [r.token_ids for r in every]


# ------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize(("layers", "graph"), [("top:2", [False, False, True, True]), ("all", [True] * 4)])
def test_training_keeps_no_graph_below_the_lowest_adapted_layer(layers: str, graph: list[bool]) -> None:
    """The joint update's forward (LoRA bank, autograd on): a decoder layer's output needs a gradient only from
    the first adapted layer up, so nothing below it keeps activations or gets a backward pass."""
    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None, tiny_layers=4))
    model = add_adapters(base, ["p", "q"], LoraConfig(r=4, alpha=8, dropout=0.0, layers=layers))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.train()
    needs_grad: dict[int, bool] = {}
    lm = model.get_base_model()
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: needs_grad.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).requires_grad)) for i, layer in enumerate(layer_stack(lm)[1])]
    try:
        with lora_bank(model, ["p", "q"]):
            out = model(input_ids=torch.tensor([[5, 6, 7, 8]] * 2)).logits
        out.float().pow(2).mean().backward()
    finally:
        for h in hooks:
            h.remove()
    assert [needs_grad[i] for i in range(4)] == graph
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}  # (A's are 0 while B starts at 0)
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())


def test_a_seq2seq_adapter_on_the_encoder_leaves_no_trunk() -> None:
    """Cross-attention reads the encoder's output, which an encoder adapter changes per stream: no layer is shared."""
    base = load_base(ModelConfig(name="tiny-t5", system_prompt=None, tiny_layers=4))
    add_adapters(base, ["p"], LoraConfig(layers="top:1"))
    add_adapters(base, ["q"], LoraConfig())  # all: encoder and decoder
    lm = base.model.get_base_model()
    assert adapted_layers(lm, "p") == [3] and adapted_layers(lm, "q") is None
    ens = EnsembleModel(base, None, require_metadata=False)
    assert ens.trunk(["p"]) == 3 and ens.trunk(["p", "q"]) == 0

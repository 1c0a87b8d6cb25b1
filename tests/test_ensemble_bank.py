"""LoRA bank: one batched forward for K adapters must equal peft's own per-row routing, and the weighted mode
must equal explicitly merged weights W0 + sum_k w_k s_k B_k A_k."""

from __future__ import annotations

import copy

import pytest
import torch

from emorl.config import LoraConfig, ModelConfig
from emorl.ensemble import lora_bank
from emorl.models import Base, adapters_disabled, add_adapters, fingerprint, load_base
from emorl.utils import EmorlError

NAMES = ["ref", "emp", "flu"]


def _randomise_b(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """peft initialises B = 0 (a no-op adapter); give every adapter its own non-zero B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, std, generator=g)


def _with_adapters(base: Base, r: int = 4) -> Base:
    add_adapters(base, NAMES, LoraConfig(r=r, alpha=2 * r, dropout=0.0))
    _randomise_b(base.model)
    return base


@pytest.fixture(scope="module")
def llama() -> Base:
    return _with_adapters(load_base(ModelConfig(name="tiny-llama", system_prompt=None)))


@pytest.fixture(scope="module")
def t5() -> Base:
    return _with_adapters(load_base(ModelConfig(name="tiny-t5", system_prompt=None)))


@pytest.fixture(scope="module")
def gpt2() -> Base:
    """GPT-2 (Conv1D layers, fan_in_fan_out LoRA) built from a config, with the SmolLM2 tokenizer's vocab."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(ref.tokenizer), n_embd=64, n_layer=2, n_head=4,
                                       n_positions=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    base = Base(model=model, tokenizer=ref.tokenizer, name="tiny-gpt2", is_seq2seq=False, device=torch.device("cpu"),
                fingerprint=fingerprint(model), config=ref.config)
    add_adapters(base, NAMES, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"]))
    _randomise_b(base.model)
    return base


def _ids(n: int, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(10, 5000, (n, length), generator=torch.Generator().manual_seed(seed))


def _forward(base: Base, ids: torch.Tensor, **kw) -> torch.Tensor:
    if base.is_seq2seq:
        dec = torch.full((ids.shape[0], 3), base.tokenizer.pad_token_id)
        dec[:, 1:] = ids[:, :2]
        return base.model(input_ids=ids, decoder_input_ids=dec, **kw).logits
    return base.model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2"])
def test_routed_bank_equals_peft_adapter_names(arch: str, request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue(arch)
    ids = _ids(6)
    with torch.no_grad():
        ref = _forward(base, ids, adapter_names=[n for n in NAMES for _ in range(2)])
        with adapters_disabled(base.model):
            plain = _forward(base, ids)
        with lora_bank(base.model, NAMES):
            got = _forward(base, ids)
    assert (ref - plain).abs().max() > 1e-2, "adapters must change the output for this test to mean anything"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bank_under_generate_equals_peft_routing(llama: Base) -> None:
    """The trainer's use: generate() of a PeftModel with rows laid out adapter-major, greedy and sampled."""
    m = llama.model
    ids = _ids(6, 5)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "pad_token_id": 2}
    names = [n for n in NAMES for _ in range(2)]
    with torch.no_grad():
        ref = m.generate(**kw, do_sample=False, adapter_names=names)
        with lora_bank(m, NAMES):
            got = m.generate(**kw, do_sample=False)
        assert torch.equal(got, ref)
        torch.manual_seed(3)
        ref_s = m.generate(**kw, do_sample=True, top_k=0, adapter_names=names)
        with lora_bank(m, NAMES):
            torch.manual_seed(3)
            got_s = m.generate(**kw, do_sample=True, top_k=0)
    assert torch.equal(got_s, ref_s)


def _explicit_merge(base: Base, weights: list[float]) -> torch.nn.Module:
    """A plain copy of the base with W = W0 + sum_k w_k * scaling_k * B_k @ A_k written out per layer."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    m = copy.deepcopy(base.model)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoraLinear):
                delta = sum(w * mod.scaling[n] * (mod.lora_B[n].weight @ mod.lora_A[n].weight)
                            for w, n in zip(weights, NAMES, strict=True))
                mod.base_layer.weight += delta.T if mod.fan_in_fan_out else delta
    return m.unload()


@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2"])
def test_weighted_bank_equals_explicit_merged_weights(arch: str, request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue(arch)
    points = [[0.7, 0.2, 0.0], [0.1, 0.5, 1.3]]
    ids = _ids(4)
    with torch.no_grad(), lora_bank(base.model, NAMES, torch.tensor(points)):
        got = _forward(base, ids)
    for g, w in enumerate(points):
        merged = Base(**{**base.__dict__, "model": _explicit_merge(base, w)})
        with torch.no_grad():
            ref = _forward(merged, ids[2 * g:2 * g + 2])
        torch.testing.assert_close(got[2 * g:2 * g + 2], ref, rtol=1e-4, atol=1e-4)


def test_weighted_bank_equals_peft_cat_combination(llama: Base) -> None:
    m = llama.model
    w = [0.6, 0.3, 0.9]
    ids = _ids(3)
    c = copy.deepcopy(m)
    c.add_weighted_adapter(NAMES, w, "mix", combination_type="cat")
    c.set_adapter("mix")
    with torch.no_grad():
        ref = c(input_ids=ids).logits
        with lora_bank(m, NAMES, torch.tensor([w])):
            got = m(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bank_gradients_match_single_adapter_path(llama: Base) -> None:
    """With autograd on, group i's loss reaches adapter i exactly as peft's single-adapter forward does."""
    m = llama.model
    ids = _ids(6)
    params = {n: p for n, p in m.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with lora_bank(m, NAMES):
            m(input_ids=ids).logits[2:4].pow(2).mean().backward()  # rows of adapter "emp" only
        got = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        m.set_adapter("emp")
        m(input_ids=ids[2:4]).logits.pow(2).mean().backward()
        for n, p in params.items():
            if ".emp." in n:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
            else:
                assert got[n].abs().max() == 0
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        m.set_adapter("ref")


def test_bank_errors_and_restores(llama: Base) -> None:
    m = llama.model
    layer = next(mod for mod in m.modules() if hasattr(mod, "lora_A") and mod.lora_A)
    with torch.no_grad():
        with pytest.raises(ValueError, match="not a multiple of 3"), lora_bank(m, NAMES):
            m(input_ids=_ids(4))
        assert "forward" not in layer.__dict__, "the patched forward must be removed on exit"
        with pytest.raises(EmorlError, match="unknown adapter"), lora_bank(m, ["ref", "zz"]):
            pass
        with pytest.raises(EmorlError, match="nested"), lora_bank(m, NAMES), lora_bank(m, NAMES):
            pass
        assert "forward" not in layer.__dict__
        with pytest.raises(EmorlError, match=r"weights must be \(G, 3\)"), lora_bank(m, NAMES, torch.ones(2, 2)):
            pass
        ids = _ids(3)
        with adapters_disabled(m):
            plain = m(input_ids=ids).logits
        with lora_bank(m, NAMES), adapters_disabled(m):
            torch.testing.assert_close(m(input_ids=ids).logits, plain)


def test_bank_in_bfloat16_equals_peft_and_fingerprint_ignores_dtype() -> None:
    """model.dtype=bfloat16 (about 4x the matmul throughput of float32 on CPUs with AVX512-BF16): the bank computes
    the deltas in the base's dtype and matches peft's routing; the fingerprint ignores the dtype, so adapters move
    between a float32 and a bfloat16 load of the same base."""
    from emorl.models import AdapterInfo, check_same_base

    fp32 = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    base = _with_adapters(load_base(ModelConfig(name="tiny-llama", system_prompt=None, dtype="bfloat16")))
    assert base.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert base.fingerprint == fp32.fingerprint
    legacy = fingerprint(fp32.model, legacy=True)
    assert fingerprint(base.model, legacy=True) != legacy  # the values-as-they-are hash sees the dtype
    check_same_base(fp32, AdapterInfo(objective="x", base={"name": "tiny-llama", "fingerprint": legacy}),
                    "old-adapter")  # an adapter made before the dtype-free fingerprint still loads
    with pytest.raises(EmorlError, match="fingerprint"):
        check_same_base(fp32, AdapterInfo(objective="x", base={"name": "tiny-llama", "fingerprint": "0" * 16}), "x")
    ids = _ids(6)
    with torch.no_grad():
        ref = _forward(base, ids, adapter_names=[n for n in NAMES for _ in range(2)])
        with lora_bank(base.model, NAMES):
            got = _forward(base, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.05, atol=0.05)

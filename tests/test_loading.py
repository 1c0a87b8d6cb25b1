"""GPU-safe loading, checked on the CPU: the base and the reward models are read by ``from_pretrained`` straight
onto their device (``device_map``) in their dtype (no float32 copy in host RAM first); reward models follow the
base's dtype on CUDA and stay float32 on the CPU; the full fine-tune baseline's copy is in the run's dtype."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from emorl.config import ModelConfig
from emorl.models import load_base, load_kwargs
from emorl.rewards.base import Options, RewardError, clear_cache, pick_dtype


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random model saved as a model folder (float32), as a hub download would be."""
    b = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    d = tmp_path_factory.mktemp("tiny-model")
    b.model.save_pretrained(d)
    b.tokenizer.save_pretrained(d)
    return str(d)


def record(monkeypatch: pytest.MonkeyPatch, cls: Any) -> list[dict[str, Any]]:
    """Wrap ``cls.from_pretrained`` to record the keyword arguments of every call (the real load still runs)."""
    calls: list[dict[str, Any]] = []
    real = cls.from_pretrained.__func__

    def spy(klass: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_load_kwargs_name_the_device_and_dtype() -> None:
    cfg = ModelConfig(dtype="bfloat16")
    cuda = torch.device("cuda:1")
    assert load_kwargs(cfg, cuda) == {"dtype": torch.bfloat16, "device_map": {"": cuda}}
    assert load_kwargs(ModelConfig(dtype="float32"), torch.device("cpu"))["dtype"] == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_loads_onto_its_device_in_its_dtype(tiny_dir: str, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    calls = record(monkeypatch, AutoModelForCausalLM)
    base = load_base(ModelConfig(name=tiny_dir, device="cpu", dtype=dtype, system_prompt=None))
    assert len(calls) == 1
    assert calls[0]["dtype"] == getattr(torch, dtype) and calls[0]["device_map"] == {"": torch.device("cpu")}
    params = list(base.model.parameters())
    assert {p.dtype for p in params} == {getattr(torch, dtype)} and {p.device.type for p in params} == {"cpu"}
    ref = load_base(ModelConfig(name="tiny-llama", system_prompt=None)).model.state_dict()  # what was saved
    got = base.model.state_dict()
    assert all(torch.equal(got[k], v.to(getattr(torch, dtype))) for k, v in ref.items())


def fake_base(dtype: torch.dtype, device: str) -> Any:
    return SimpleNamespace(model=torch.nn.Linear(2, 2, dtype=dtype), device=torch.device(device))


def test_reward_models_take_the_base_dtype_on_cuda_and_float32_on_cpu() -> None:
    opts = Options("judge", {"type": "hf-classifier"})
    assert pick_dtype(opts, fake_base(torch.bfloat16, "cuda"), "cuda") == torch.bfloat16
    assert pick_dtype(opts, fake_base(torch.float16, "cuda"), "cuda:1") == torch.float16
    assert pick_dtype(opts, fake_base(torch.bfloat16, "cpu"), "cpu") == torch.float32  # CPU scores as before
    assert pick_dtype(opts, None, "cuda") == torch.float32  # no base to follow
    forced = Options("judge", {"type": "hf-classifier", "dtype": "bfloat16"})
    assert pick_dtype(forced, fake_base(torch.float32, "cpu"), "cpu") == torch.bfloat16
    with pytest.raises(RewardError, match=r"objectives\.judge\.dtype"):
        pick_dtype(Options("judge", {"type": "hf-classifier", "dtype": "int8"}), None, "cpu")


def test_reward_models_load_onto_their_device_in_their_dtype(tiny_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    from emorl.rewards import build_reward
    from emorl.rewards.text import default_encoder_path

    clear_cache()
    lm_calls = record(monkeypatch, AutoModelForCausalLM)
    enc_calls = record(monkeypatch, AutoModel)
    ppl = build_reward("ppl", {"type": "perplexity", "model": tiny_dir, "dtype": "bfloat16"})
    ppl.load()
    assert lm_calls[-1]["dtype"] == torch.bfloat16 and lm_calls[-1]["device_map"] == {"": torch.device("cpu")}
    assert {p.dtype for p in ppl.model.parameters()} == {torch.bfloat16}
    refl = build_reward("reflection", {"type": "reflection"})
    refl.load()
    assert enc_calls[-1]["dtype"] == torch.float32 and enc_calls[-1]["device_map"] == {"": torch.device("cpu")}
    half = build_reward("reflection", {"type": "reflection", "dtype": "bfloat16"})
    half.load()
    assert half.encoder is not refl.encoder  # one shared encoder per (path, device, dtype)
    assert {p.dtype for p in half.encoder.model.parameters()} == {torch.bfloat16}
    texts = ["I lost my job today.", "That sounds really hard; I am here for you."]
    e32, e16 = refl.encoder.encode(texts), half.encoder.encode(texts)
    assert e16.dtype == torch.float32 and (e32 * e16).sum(-1).min() > 0.99  # the same embeddings, bf16-rounded
    assert refl.encoder.path == default_encoder_path()
    clear_cache()


def test_full_finetune_copy_is_in_the_runs_dtype_with_optimizer_state_to_match() -> None:
    """The trainable copy of a full fine-tune baseline is the base loaded again in the run's dtype: no float32
    master copy; AdamW's two moments follow the parameters' dtype (what docs/scale.md's estimate counts)."""
    from emorl.config import load_config
    from emorl.train.full import own_model

    cfg = load_config("tiny", ["model.dtype=bfloat16"])
    model, params = own_model(cfg)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert {t.dtype for t in state} == {torch.bfloat16}
    assert sum(t.numel() for t in state) == 2 * sum(p.numel() for p in params.values())


def test_a_full_finetune_that_cannot_fit_is_refused_before_loading() -> None:
    from emorl.config import load_config
    from emorl.memory import run_config_shape
    from emorl.train.full import check_fits
    from emorl.utils import EmorlError

    cfg = load_config("tiny", ["model.dtype=bfloat16"])
    need = 4 * run_config_shape(cfg).params * 2  # the copy, its gradients, AdamW's m and v, 2 bytes each
    check_fits(cfg, need, "bfloat16")  # just fits
    with pytest.raises(EmorlError, match=r"lora\.full_finetune: .* needs .* in bfloat16.* model\.dtype=bfloat16"):
        check_fits(cfg, need - 1, "bfloat16")
    check_fits(cfg, 2 * need, "float32")  # float32 needs twice as much: just fits
    with pytest.raises(EmorlError, match=r"in float32"):
        check_fits(cfg, 2 * need - 1, "float32")


def test_the_lm_head_gets_contiguous_inputs_and_the_same_logits() -> None:
    """transformers slices ``hidden[:, -n:, :]`` before the head (``logits_to_keep``); on the CPU in bfloat16 that
    strided input takes a GEMM path 10-100x slower, so :func:`contiguous_head_inputs` copies it first. The head
    must see a contiguous tensor and give the same logits as with the slice (and as logits_to_keep=0 sliced)."""
    from emorl.models.load import contiguous_head_inputs

    base = load_base(ModelConfig(name="tiny-llama", dtype="bfloat16"))
    head = base.model.get_output_embeddings()
    assert getattr(head, "_emorl_contiguous", False), "load_base must install the hook"
    seen: list[bool] = []
    h = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))  # runs after ours
    ids = torch.randint(0, 100, (3, 7))
    with torch.inference_mode():
        kept = base.model(input_ids=ids, logits_to_keep=4).logits
        full = base.model(input_ids=ids).logits[:, -4:]
    h.remove()
    assert seen and all(seen)
    torch.testing.assert_close(kept, full)
    contiguous_head_inputs(base.model)  # idempotent: still one hook of ours
    assert sum(1 for f in head._forward_pre_hooks.values() if f.__name__ == "_contiguous_input") == 1

"""The memory estimate (emorl.memory) against a hand computation on the tiny model's config, against the tensors a
loaded tiny model, its LoRA adapters and its KV cache really hold, and against the published parameter counts of the
four sizes docs/scale.md tabulates."""

from __future__ import annotations

import pytest
import torch

from emorl.config import LoraConfig, ModelConfig, load_config
from emorl.memory import (
    BYTES,
    LORA_BYTES,
    decoding,
    for_run,
    known_shape,
    kv_bytes_per_token,
    run_config_shape,
    shape,
    training,
)
from emorl.models import add_adapters, load_base

# the tiny model (ModelConfig defaults): vocabulary 49152 (SmolLM2's tokenizer), hidden 64, MLP 128, 2 layers,
# 4 query heads and 2 key/value heads of 16 dimensions, tied embeddings
V, H, MLP, L, KV, D = 49152, 64, 128, 2, 2, 16
PER_LAYER = (H * H + H * KV * D + H * KV * D + H * H  # q, k, v, o projections (no biases)
             + 3 * H * MLP  # gate, up, down
             + 2 * H)  # two RMSNorm weights
TINY_PARAMS = V * H + L * PER_LAYER + H  # embeddings (tied with the head) + layers + final norm
# LoRA of rank r on every linear but the head adds r * (in + out) per linear
TINY_LORA_PER_RANK = L * ((H + H) + (H + KV * D) * 2 + (H + H) + (H + MLP) * 2 + (MLP + H))
TINY_KV_PER_TOKEN = 2 * L * KV * D  # keys and values, every layer


@pytest.fixture(scope="module")
def tiny():
    return load_base(ModelConfig(name="tiny-llama", system_prompt=None))


def test_tiny_shape_is_the_hand_computation(tiny) -> None:
    assert (TINY_PARAMS, TINY_LORA_PER_RANK, TINY_KV_PER_TOKEN) == (3219776, 2048, 128)
    s = shape(tiny.model.config)
    assert (s.params, s.lora_per_rank, s.kv_per_token) == (TINY_PARAMS, TINY_LORA_PER_RANK, TINY_KV_PER_TOKEN)
    assert (s.layers, s.hidden, s.intermediate, s.vocab) == (L, H, MLP, V)
    only_attention = shape(tiny.model.config, ["q_proj", "v_proj"])
    assert only_attention.lora_per_rank == L * ((H + H) + (H + KV * D))


def test_estimate_matches_the_tensors_of_a_loaded_model(tiny) -> None:
    s = shape(tiny.model.config)
    weights = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
    assert weights == decoding(s, dtype="float32", adapters=0, r=8, streams=0, tokens=0).parts["weights"]
    r, names = 8, ["a", "b", "c"]
    bf16 = load_base(ModelConfig(name="tiny-llama", system_prompt=None, dtype="bfloat16"))
    model = add_adapters(bf16, names, LoraConfig(r=r, alpha=16, dropout=0.0))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in lora} == {torch.float32}  # adapters stay float32 on a bfloat16 base
    measured = sum(p.numel() * p.element_size() for p in lora)
    assert measured == decoding(s, dtype="bfloat16", adapters=3, r=r, streams=0, tokens=0).parts["adapters"]
    assert measured == 3 * r * TINY_LORA_PER_RANK * LORA_BYTES
    for dtype, base in (("float32", tiny), ("bfloat16", bf16)):
        tokens = 11
        ids = torch.arange(1, tokens + 1).unsqueeze(0)
        m = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
        with torch.no_grad():
            cache = m(input_ids=ids, use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert held == tokens * kv_bytes_per_token(s, dtype) == tokens * TINY_KV_PER_TOKEN * BYTES[dtype]


def test_decoding_and_training_add_up_by_hand(tiny) -> None:
    s = shape(tiny.model.config)
    dec = decoding(s, dtype="bfloat16", adapters=3, r=4, streams=8, tokens=100)
    assert dec.parts == {"weights": TINY_PARAMS * 2, "adapters": 3 * 4 * TINY_LORA_PER_RANK * 4,
                         "kv_cache": 8 * 100 * TINY_KV_PER_TOKEN * 2, "logits": 8 * V * 4}
    assert dec.total == sum(dec.parts.values())
    lora = training(s, dtype="float32", policies=3, r=4, rollout_rows=48, micro_batch=6, tokens=100)
    assert lora.parts["adapters_grads_adamw"] == 3 * 4 * TINY_LORA_PER_RANK * 16  # parameter, gradient, m, v
    assert lora.parts["rollout_kv_cache"] == 48 * 100 * TINY_KV_PER_TOKEN * 4
    assert lora.parts["activations"] == 6 * 100 * (L * (6 * H + 4 * MLP) * 4 + 2 * V * 4)
    full = training(s, dtype="bfloat16", policies=2, r=4, rollout_rows=48, micro_batch=6, tokens=100,
                    full_finetune=True)
    assert full.parts["policies"] == 2 * 4 * TINY_PARAMS * 2 and "adapters_grads_adamw" not in full.parts


def test_run_config_estimate() -> None:
    cfg = load_config("tiny")
    s = run_config_shape(cfg)
    assert s.params == TINY_PARAMS
    est = for_run(cfg, s)
    n_adapters, tokens = len(cfg.objectives), cfg.model.max_prompt_tokens + cfg.train.generation.max_new_tokens
    assert est["decoding"].parts["kv_cache"] == (n_adapters + 1) * tokens * TINY_KV_PER_TOKEN * 4  # float32 preset
    assert est["training"].parts["rollout_kv_cache"] == \
        n_adapters * cfg.train.batch_size * cfg.train.k * tokens * 128 * 4


def test_known_sizes_have_their_published_parameter_counts() -> None:
    """The model cards' counts: SmolLM2-135M 134,515,008; Qwen2.5-0.5B 494,032,768 (with q/k/v biases);
    Qwen2.5-1.5B 1,543,714,304; Llama-3.1-8B 8,030,261,248 (untied head)."""
    counts = {name: known_shape(name).params for name in ("135M (SmolLM2-135M)", "0.5B (Qwen2.5-0.5B)",
                                                          "1.5B (Qwen2.5-1.5B)", "8B (Llama-3.1-8B)")}
    assert list(counts.values()) == [134_515_008, 494_032_768, 1_543_714_304, 8_030_261_248]
    eight = known_shape("8B (Llama-3.1-8B)")
    assert eight.kv_per_token == 2 * 32 * 8 * 128  # 128 KiB per token in bfloat16


def test_the_default_model_matches_its_known_shape() -> None:
    real = load_base(ModelConfig(device="cpu"))
    assert sum(p.numel() for p in real.model.parameters()) == known_shape("135M (SmolLM2-135M)").params
    assert run_config_shape(load_config("default")) == known_shape("135M (SmolLM2-135M)")


def test_bench_memory_quick_mode_runs(tmp_path) -> None:
    """bench/memory.py (run by bench/gpu.sh on a GPU) runs on the tiny model and reports where the models landed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "memory.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
    subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], check=True, capture_output=True,
                   timeout=300)
    got = json.loads(out.read_text())
    assert got["base"] == ["cpu/torch.float32"] and got["reward_models"]
    assert got["estimate_gib"]["total"] == pytest.approx(sum(v for k, v in got["estimate_gib"].items() if k != "total"),
                                                         abs=0.02)

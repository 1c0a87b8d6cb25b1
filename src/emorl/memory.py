"""How much device memory a run needs, computed from the model's config (not measured): for training (the base,
K LoRA adapters with their gradients and AdamW state, the rollouts' KV cache, the update's activations; or a full
fine-tune baseline's own copy) and for K-adapter decoding (the base, K adapters, the KV cache of every stream).

Parameter counts come from the model built on PyTorch's ``meta`` device (shapes only, no memory), so any
architecture transformers knows is counted exactly, tied embeddings once. Activations are an approximation
(see :func:`training`); weights, adapters, optimizer state and the KV cache are exact element counts.

    python -m emorl.memory            # the table of docs/scale.md (135M, 0.5B, 1.5B, 8B)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emorl.config import RunConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_BYTES = 4  # LoRA parameters (and their optimizer) stay float32 whatever the base's dtype
GIB = 1024 ** 3


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a transformers model config."""

    params: int  # every parameter, tied embeddings counted once
    lora_per_rank: int  # LoRA parameters of one adapter per unit of rank: sum of (in + out) over adapted linears
    kv_per_token: int  # key and value elements one stream keeps per token, all layers together
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def _targets(model: Any, target_modules: list[str] | str) -> list[Any]:
    """The linear layers a LoRA adapter adapts: every ``nn.Linear`` but the output head (peft's "all-linear"), or
    those whose name ends with one of ``target_modules``."""
    import torch

    head = model.get_output_embeddings()
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        if target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules):
            out.append(m)
    return out


def shape(config: Any, target_modules: list[str] | str = "all-linear") -> Shape:
    """The :class:`Shape` of a causal LM config (``transformers.PretrainedConfig``), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 lora_per_rank=sum(m.in_features + m.out_features for m in _targets(model, target_modules)),
                 kv_per_token=2 * text.num_hidden_layers * kv_heads * head_dim, layers=text.num_hidden_layers,
                 hidden=text.hidden_size, intermediate=text.intermediate_size, vocab=text.vocab_size)


@dataclass
class Estimate:
    """Bytes by part; ``total`` is their sum."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 2) for k, v in self.parts.items()}, "total": round(self.total / GIB, 2)}


def kv_bytes_per_token(s: Shape, dtype: str) -> int:
    """KV cache of one token of one stream (a base-anchored hidden mix of K adapters decodes K + 1 streams)."""
    return s.kv_per_token * BYTES[dtype]


def decoding(s: Shape, *, dtype: str, adapters: int, r: int, streams: int, tokens: int) -> Estimate:
    """K-adapter decoding: the base, ``adapters`` LoRA adapters of rank ``r``, and ``streams`` KV caches of
    ``tokens`` tokens each (prompt + reply; a request mixing K adapters around the base is K + 1 streams), plus one
    step's float32 logits per stream."""
    return Estimate({"weights": s.params * BYTES[dtype], "adapters": adapters * r * s.lora_per_rank * LORA_BYTES,
                     "kv_cache": streams * tokens * kv_bytes_per_token(s, dtype),
                     "logits": streams * s.vocab * 4})


def activations(s: Shape, *, dtype: str, rows: int, tokens: int) -> int:
    """What the update's backward keeps, approximately (within about ±50%): per token and layer the inputs of the
    attention projections and of the MLP (~6 hidden-sized and 4 intermediate-sized tensors; SDPA keeps no attention
    matrix), plus float32 logits and their gradient over the vocabulary."""
    per_token = s.layers * (6 * s.hidden + 4 * s.intermediate) * BYTES[dtype] + 2 * s.vocab * 4
    return rows * tokens * per_token


def training(s: Shape, *, dtype: str, policies: int, r: int, rollout_rows: int, micro_batch: int, tokens: int,
             full_finetune: bool = False) -> Estimate:
    """Training ``policies`` policies together (EMORL's K adapters, or the baselines trained in one run):
    the frozen base; per LoRA policy its float32 parameters, gradients and AdamW's two moments (16 bytes a
    parameter); or, fine-tuning fully, per policy its own copy of the base with gradients and two moments, all in
    the run's dtype (4 × the weights; no float32 master copy); the rollouts' KV cache (``rollout_rows`` sequences of
    ``tokens``) and the update's activations (``micro_batch`` rows at a time)."""
    b = BYTES[dtype]
    parts = {"weights": s.params * b}
    if full_finetune:
        parts["policies"] = policies * 4 * s.params * b
    else:
        parts["adapters_grads_adamw"] = policies * r * s.lora_per_rank * LORA_BYTES * 4
    parts["rollout_kv_cache"] = rollout_rows * tokens * kv_bytes_per_token(s, dtype)
    parts["activations"] = activations(s, dtype=dtype, rows=micro_batch, tokens=tokens)
    return Estimate(parts)


def run_config_shape(cfg: RunConfig) -> Shape:
    """The shape of a run's base model (reads its config only; a tiny model is built, it is small)."""
    from emorl.models import DEFAULT_MODEL, TINY_MODELS, load_base, smollm2_dir

    name = cfg.model.name
    if name in TINY_MODELS:
        config = load_base(cfg.model).model.config
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(smollm2_dir()) if name == DEFAULT_MODEL else name)
    return shape(config, cfg.lora.target_modules)


def for_run(cfg: RunConfig, s: Shape | None = None, dtype: str | None = None) -> dict[str, Estimate]:
    """Training and decoding estimates for a run config: K adapters trained together (batch_size × k rollouts
    each), one request decoded with the K adapters around the base (K + 1 streams) at the training lengths."""
    s = s or run_config_shape(cfg)
    dtype = dtype or (cfg.model.dtype if cfg.model.dtype != "auto" else "bfloat16")
    n = len(cfg.objectives)
    tokens = cfg.model.max_prompt_tokens + cfg.train.generation.max_new_tokens
    t = cfg.train
    return {"training": training(s, dtype=dtype, policies=n, r=cfg.lora.r, rollout_rows=n * t.batch_size * t.k,
                                 micro_batch=t.micro_batch_size, tokens=tokens),
            "decoding": decoding(s, dtype=dtype, adapters=n, r=cfg.lora.r, streams=n + 1, tokens=tokens)}


# Published configs of the four sizes the docs tabulate (no download: the numbers are the hub's config.json's), one
# row a model: its model_type, then the values of KNOWN_KEYS in that order.
KNOWN_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings")
KNOWN: dict[str, tuple[str, int, int, int, int, int, int, bool]] = {
    "135M (SmolLM2-135M)": ("llama", 49152, 576, 1536, 30, 9, 3, True),
    "0.5B (Qwen2.5-0.5B)": ("qwen2", 151936, 896, 4864, 24, 14, 2, True),
    "1.5B (Qwen2.5-1.5B)": ("qwen2", 151936, 1536, 8960, 28, 12, 2, True),
    "8B (Llama-3.1-8B)": ("llama", 128256, 4096, 14336, 32, 32, 8, False),
}


def known_shape(name: str, target_modules: list[str] | str = "all-linear") -> Shape:
    """The shape of one of the KNOWN models, built from its config alone."""
    from transformers import AutoConfig

    model_type, *values = KNOWN[name]
    return shape(AutoConfig.for_model(model_type, **dict(zip(KNOWN_KEYS, values, strict=True))), target_modules)


def table(adapters: int = 3, r: int = 8, dtype: str = "bfloat16", batch: int = 16, replies: int = 3,
          micro_batch: int = 6, tokens: int = 192, requests: int = 64) -> str:
    """The Markdown table of docs/scale.md: per model size, training K LoRA adapters (batch × replies rollouts
    each), one full fine-tune baseline, and serving ``requests`` concurrent base-anchored K-adapter mixes."""
    rows = ["| model | parameters | weights | K=3 adapters (+grads, AdamW) | KV / token / stream | train K LoRA "
            "| train 1 full FT | serve 64 requests |", "|---|---|---|---|---|---|---|---|"]
    for name in KNOWN:
        s = known_shape(name)
        lora = training(s, dtype=dtype, policies=adapters, r=r, rollout_rows=adapters * batch * replies,
                        micro_batch=micro_batch, tokens=tokens)
        full = training(s, dtype=dtype, policies=1, r=r, rollout_rows=batch * replies, micro_batch=micro_batch,
                        tokens=tokens, full_finetune=True)
        dec = decoding(s, dtype=dtype, adapters=adapters, r=r, streams=requests * (adapters + 1), tokens=tokens)
        kv = kv_bytes_per_token(s, dtype) / 1024
        rows.append(f"| {name} | {s.params / 1e9:.3f} B | {lora.parts['weights'] / GIB:.2f} GiB | "
                    f"{lora.parts['adapters_grads_adamw'] / GIB:.2f} GiB | {kv:.0f} KiB | {lora.total / GIB:.1f} GiB | "
                    f"{full.total / GIB:.1f} GiB | {dec.total / GIB:.1f} GiB |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

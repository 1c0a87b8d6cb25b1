"""Loading a base model: any causal or seq2seq LM by hub id or path, the packaged default, or a random tiny model
for tests; and the fingerprint that ties adapters to their base."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from emorl.config import ModelConfig
from emorl.models.base import DEFAULT_MODEL, TINY_MODELS, Base
from emorl.models.gguf import check_model_dir, smollm2_dir, smollm2_tokenizer_dir
from emorl.models.hardware import _dtype
from emorl.utils import (
    EmorlError,
    resolve_device,
)

log = logging.getLogger("emorl.models")


def _build_tiny(name: str, cfg: ModelConfig, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(cfg.seed)
    h = cfg.tiny_hidden
    if name == "tiny-llama":
        mc = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=cfg.tiny_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
        return LlamaForCausalLM(mc)
    mc = T5Config(vocab_size=len(tok), d_model=h, d_kv=h // 4, d_ff=2 * h, num_layers=cfg.tiny_layers,
                  num_decoder_layers=cfg.tiny_layers, num_heads=4, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return T5ForConditionalGeneration(mc)


def load_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that put the weights straight on ``device`` in the requested dtype: on CUDA an
    8B model is read shard by shard into GPU memory, never whole into host RAM first (nor in float32 first)."""
    if device.type == "cuda" and device.index is None:  # "cuda": the current device (the one Ray or the user set)
        device = torch.device("cuda", torch.cuda.current_device())
    return {"dtype": _dtype(cfg, device), "device_map": {"": device}}


def load_base(cfg: ModelConfig | None = None) -> Base:
    """Load the base model and tokenizer described by ``cfg`` (eval mode, on its device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = cfg or ModelConfig()
    device = resolve_device(cfg.device)
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    name = cfg.name
    if name in TINY_MODELS:
        tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir(root)))
        model = _build_tiny(name, cfg, tok)
        is_s2s = name == "tiny-t5"
    else:
        path = str(smollm2_dir(root)) if name == DEFAULT_MODEL else name
        if Path(path).is_dir():  # a local folder (a fully fine-tuned policy, a copied model): whole?
            check_model_dir(Path(path), f"model.name={name!r}: file",
                            "restore the folder (copy it again), or re-train it if emorl made it")
        try:
            mcfg = AutoConfig.from_pretrained(path)
        except OSError as e:
            raise EmorlError(f"model.name={name!r}: cannot load it ({e}). Give a local folder with config.json, "
                             f"a hub id (needs a network), or {DEFAULT_MODEL!r} (offline default)") from e
        is_s2s = cfg.kind == "seq2seq" or (cfg.kind == "auto" and bool(getattr(mcfg, "is_encoder_decoder", False)))
        cls = AutoModelForSeq2SeqLM if is_s2s else AutoModelForCausalLM
        log.debug("loading %s from %s", name, path)
        tok = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, **load_kwargs(cfg, device))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left" if not is_s2s else "right"
    model.to(device=device, dtype=_dtype(cfg, device))  # a tiny model is built on the CPU; a loaded one is there
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    contiguous_head_inputs(model)
    return Base(model=model, tokenizer=tok, name=name, is_seq2seq=is_s2s, device=device,
                fingerprint=fingerprint(model), config=cfg)


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def contiguous_head_inputs(model: torch.nn.Module) -> None:
    """Make the LM head copy a strided input contiguous before its GEMM.

    transformers' causal LMs apply the head to ``hidden[:, -n:, :]`` (``logits_to_keep``): a 3-D slice. On the CPU
    in bfloat16 that strided input sends ``F.linear`` to a path 10-130x slower than the same rows contiguous
    (measured on this project's 2-core AVX512 machine, SmolLM2's 49152x576 head: 16 rows x 33 positions 1.0 s
    against 0.09 s; the last position of 16 prompts 0.95 s against 0.007 s). The copy costs a few microseconds.
    Every prefill in ``generate``, every log-likelihood reward and judge, and training's prompt forward take this
    path. Idempotent (one hook per head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_emorl_contiguous", False):
        return
    head.register_forward_pre_hook(_contiguous_input)
    head._emorl_contiguous = True


def fingerprint(model: torch.nn.Module, legacy: bool = False) -> str:
    """A short hash of the base weights (every tensor's name, shape and a strided sample of its values).

    Cheap (~0.1 s on 135M parameters) and stable across save/load, devices and dtypes: the sampled values are
    rounded to bfloat16 first, so a base loaded in float32 and the same base in bfloat16 (``model.dtype``) match.
    Used to refuse adapters that were trained on a different base. ``legacy``: the earlier hash of the values as
    they are (what adapters trained before carry)."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        if "lora_" in k:
            continue
        t = sd[k].detach()
        h.update(k.removeprefix("base_model.model.").encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step].to(device="cpu")
        if not legacy:
            sample = sample.to(torch.bfloat16)
        h.update(sample.to(torch.float32).numpy().round(4).tobytes())
    return h.hexdigest()[:16]

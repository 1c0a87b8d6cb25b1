"""Adapters on disk: peft's own format plus ``emorl.json`` (objective, rewards, base identity, curves); creating,
saving, reading and loading them; adapters trained on another base are refused (fingerprint mismatch)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorl.config import LoraConfig
from emorl.models.base import Base
from emorl.models.load import fingerprint
from emorl.utils import (
    EmorlError,
    atomic_folder,
    atomic_write_json,
    check_safetensors,
    read_json_checked,
)


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
    lm = model.base_model.model if isinstance(model, PeftModel) else model  # not get_base_model(): the active
    pcfg = peft_lora_config(cfg, base.is_seq2seq, lm)  # adapter may have been deleted (a base reused across runs)
    for n in names:
        with seeded_rng(stable_seed(seed, n, "lora-init"), base.device):
            if isinstance(model, PeftModel):
                model.add_adapter(n, pcfg)
            else:
                model = get_peft_model(model, pcfg, adapter_name=n)
                base.model = model
    model.eval()
    return model


def randomize_lora_b(model: Any, std: float, seed: int = 0) -> Any:
    """Draw every LoRA B matrix of ``model`` from N(0, std²), one seeded generator in parameter order. peft starts B
    at 0 (every adapter a no-op); tests and benchmarks of mixing need adapters that differ without training."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_random_adapters(base: Base, names: list[str], cfg: LoraConfig, folder: str | Path, std: float,
                         seed: int = 0) -> Any:
    """Attach adapters ``names`` with random B matrices (:func:`randomize_lora_b`) and save each to
    ``folder/<name>``: a run's ``adapters/`` without training, for tests and benchmarks. Returns the PeftModel."""
    model = randomize_lora_b(add_adapters(base, names, cfg), std, seed)
    for n in names:
        save_adapter(model, n, Path(folder) / n, AdapterInfo(objective=n, base=base.identity))
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

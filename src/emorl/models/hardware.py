"""What the machine can do: bfloat16 kernels on this CPU, the dtype ``model.dtype: auto`` picks, and the
environment a run records."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from emorl.config import ModelConfig
from emorl.models.base import Base


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

"""Shared fixtures. Tests run offline (hub access fails fast) on tiny random models built from configs; a
few tests marked ``slow`` use the real default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tiny models are dominated by per-op overhead, and with 2 OpenMP threads on a loaded 2-core
# box every small matmul spin-waits (measured 30x slower). Set EMORL_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get("EMORL_TEST_THREADS", "1")))


@pytest.fixture
def tiny_base():
    """A fresh tiny random Llama with the real SmolLM2 tokenizer (function scope: tests attach adapters)."""
    from emorl.config import ModelConfig
    from emorl.models import load_base

    return load_base(ModelConfig(name="tiny-llama", system_prompt=None))


@pytest.fixture
def tiny_t5_base():
    from emorl.config import ModelConfig
    from emorl.models import load_base

    return load_base(ModelConfig(name="tiny-t5", system_prompt=None))


@pytest.fixture(scope="session")
def smollm2_base():
    """The real default model (loaded once per session; do not attach adapters to it in place)."""
    from emorl.models import load_base

    return load_base()

"""A reply does not depend on what shares its batch: every (prompt, weights, settings) pair decoded in one batch of
many gives the tokens it gives alone, in bfloat16 too (where one ulp of difference flips sampled tokens; the tiny
model's matrices pass on an AMX CPU too, SmolLM2's do not there: bench/RESULTS.md, "Batch invariance on an AMX CPU").

Two things make it so (bench/RESULTS.md, "batch-invariant bfloat16"): prompts are left-padded to a multiple of 16
with at least one pad (attention over padding is exact only at the same alignment, and a batch without padding
takes another kernel), and matmuls of 1-3 rows are padded to ``MIN_GEMM_ROWS`` (small-row kernels round
differently). Without either, most of these pairs differ in bfloat16."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from emorl.config import load_config
from emorl.data import encode_prompts, format_prompts
from emorl.ensemble import EnsembleModel
from emorl.ensemble.pairs import PairSpec, generate_pairs
from emorl.lora_bank import MIN_GEMM_ROWS, pad_rows
from emorl.models import add_adapters, load_base, randomize_lora_b
from emorl.prompts import PAD_MULTIPLE

NAMES = ["a", "b", "c"]
SENTENCE = ("I lost my job today and nobody calls me my cat is sick I failed the exam again work is crushing me "
            "I cannot sleep my friend moved away and I miss her")
WORDS = SENTENCE.split(" ")


def _bf16_base(overrides: list[str], seed: int, n: int) -> tuple[Any, list[str]]:
    """A bf16 tiny base on the CPU with adapters whose B matrices are non-zero, and ``n`` random statements as model
    input. CPU only: the rules are about CPU kernels; on a GPU invariance is not claimed."""
    cfg = load_config("tiny", overrides)
    cfg.model.dtype = "bfloat16"
    cfg.model.device = "cpu"
    base = load_base(cfg.model)
    randomize_lora_b(add_adapters(base, NAMES, cfg.lora), std=0.3)
    rng = random.Random(seed)
    statements = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) for _ in range(n)]
    return base, [str(t) for t in format_prompts(base.tokenizer, statements, False, base.config.system_prompt)]


@pytest.fixture(scope="module")
def bf16() -> tuple[EnsembleModel, list[str]]:
    base, texts = _bf16_base([], 0, 14)
    lengths = {len(base.tokenizer(t)["input_ids"]) for t in texts}
    for extra in range(1, 40):  # a prompt whose length is a multiple of 16 (alone it would have no padding)
        t = str(format_prompts(base.tokenizer, [" ".join(WORDS[:extra])], False, base.config.system_prompt)[0])
        if len(base.tokenizer(t)["input_ids"]) % PAD_MULTIPLE == 0:
            texts.append(t)
            break
    assert any(n % PAD_MULTIPLE == 0 for n in lengths | {len(base.tokenizer(texts[-1])["input_ids"])})
    return EnsembleModel(base, None, require_metadata=False), texts


def _pairs(texts: list[str], anchored: bool, seed: int) -> list[PairSpec]:
    rng = random.Random(seed)
    out = []
    for i, text in enumerate(texts):
        w = [rng.choice([0.0, 0.0, 0.3, 0.7, 1.0]) for _ in NAMES]
        if not any(w):
            w[i % 3] = 1.0
        if not anchored:
            w = [x / sum(w) for x in w]
        sample = i % 4 != 3  # a greedy pair among sampled ones
        out.append(PairSpec(text, w, max_new_tokens=rng.randint(8, 16), do_sample=sample,
                            temperature=rng.choice([0.7, 1.0, 1.3]) if sample else 1.0,
                            top_k=rng.choice([0, 50]) if sample else 0, seed=rng.randrange(100)))
    return out


@pytest.mark.parametrize(("mode", "anchored"), [("hidden", True), ("hidden", False), ("params", False),
                                                 ("logits", True)])
def test_bfloat16_pairs_decode_the_same_tokens_alone_and_in_a_batch(bf16, mode: str, anchored: bool) -> None:
    ens, texts = bf16
    pairs = _pairs(texts, anchored, seed=len(mode) + anchored)
    batch = generate_pairs(ens, NAMES, mode, pairs, anchored=anchored)
    differ = [i for i, p in enumerate(pairs)
              if generate_pairs(ens, NAMES, mode, [p], anchored=anchored)[0].token_ids != batch[i].token_ids]
    assert differ == [], f"{len(differ)} of {len(pairs)} pairs changed with their batch: {differ}"


def test_a_lone_pair_takes_the_kernels_of_a_batch(bf16) -> None:
    """A case found by search where a lone pair's decode step (1-2 rows per adapter) rounds differently from the
    same rows in a batch of more, unless small matmuls are padded to MIN_GEMM_ROWS: pair 9 differs from its third
    token on."""
    ens, _ = bf16
    statements = ["I lost my job today.", "My cat is sick and I do not know what to do about it at all, honestly.",
                  "Nobody calls me.", "I failed the exam again and my parents are going to be so disappointed in me.",
                  "I feel alone.", "Work has been crushing me for weeks and I can't sleep anymore.", "Help.",
                  "My best friend moved away to another country last month and I miss her every single day."] * 2
    texts = format_prompts(ens.tokenizer, statements, False, ens.base.config.system_prompt)
    pairs = [PairSpec(str(t), [0.2 + 0.1 * i, 0.5, 0.1 * (i % 3)], max_new_tokens=16, do_sample=True, top_k=50,
                      seed=i) for i, t in enumerate(texts)]
    batch = generate_pairs(ens, NAMES, "hidden", pairs, anchored=True)
    differ = [i for i, p in enumerate(pairs)
              if generate_pairs(ens, NAMES, "hidden", [p], anchored=True)[0].token_ids != batch[i].token_ids]
    assert differ == []


def test_bfloat16_generate_of_many_prompts_equals_each_prompt_alone(bf16) -> None:
    ens, texts = bf16
    w = [0.6, 0.0, 1.2]  # base-anchored, one adapter unused (left out of the batch)
    kw = dict(mode="hidden", max_new_tokens=12, do_sample=True, top_k=50, seed=3, formatted=True)
    many = ens.generate(texts, w, **kw).texts
    # reply j of a call uses uniforms row j: alone, prompt j is reply j of [prompt j] * (j + 1)
    alone = [ens.generate([t] * (j + 1), w, **kw).texts[j] for j, t in enumerate(texts[:6])]
    assert alone == many[:6]


def test_prompt_padding_is_aligned_and_never_empty(bf16) -> None:
    ens, texts = bf16
    tok = ens.tokenizer
    for batch in (texts[:1], texts[-1:], texts):
        enc = encode_prompts(tok, batch, 96, False)
        width, pads = enc["input_ids"].shape[1], (1 - enc["attention_mask"]).sum(1)
        assert width % PAD_MULTIPLE == 0 and int(pads.min()) >= 1
    alone = [(1 - encode_prompts(tok, [t], 96, False)["attention_mask"]).sum() % PAD_MULTIPLE for t in texts]
    together = (1 - encode_prompts(tok, texts, 96, False)["attention_mask"]).sum(1) % PAD_MULTIPLE
    assert [int(x) for x in alone] == together.tolist()  # each prompt's padding has one alignment everywhere
    fixed = encode_prompts(tok, texts[:1], 96, False, pad_to=width)  # a width it returned before is kept
    assert fixed["input_ids"].shape[1] == width


def test_auto_dtype_is_bfloat16_only_where_replies_stay_batch_invariant(monkeypatch) -> None:
    """On an AMX CPU oneDNN picks its bf16 kernel by row count, so a reply changes with its batch: auto keeps float32
    there (bench/RESULTS.md, "Batch invariance on an AMX CPU"); AVX512-BF16 alone gets bfloat16."""
    from emorl.config import ModelConfig
    from emorl.models import hardware as models

    cpu = torch.device("cpu")
    for kernels, want in [("avx512", torch.bfloat16), ("amx", torch.float32), ("emulated", torch.float32)]:
        monkeypatch.setattr(models, "cpu_bf16_kernels", lambda k=kernels: k)
        assert models._dtype(ModelConfig(dtype="auto"), cpu) == want, kernels
    assert models._dtype(ModelConfig(dtype="bfloat16"), cpu) == torch.bfloat16  # asked for: given


def test_pad_rows() -> None:
    x = torch.ones(2, 3)
    assert pad_rows(x, 0).shape == (MIN_GEMM_ROWS, 3) and pad_rows(x, 0)[2:].abs().sum() == 0
    assert pad_rows(torch.ones(5, 3), 0).shape == (5, 3)
    assert pad_rows(torch.ones(2, 1, 3), 1).shape == (2, MIN_GEMM_ROWS, 3)


@pytest.fixture(scope="module")
def bf16_trunk() -> tuple[EnsembleModel, list[str]]:
    """Adapters on the top layer only: the ensemble runs layer 0 once per prompt (the shared trunk), where a lone
    pair's decode step is one row through plain (LoRA-free) linear layers."""
    base, texts = _bf16_base(["lora.layers=top:1"], 1, 12)
    ens = EnsembleModel(base, None, require_metadata=False)
    assert ens.trunk(NAMES) == 1
    return ens, texts


@pytest.mark.parametrize(("mode", "anchored"), [("hidden", True), ("logits", True)])
def test_pairs_over_a_shared_trunk_decode_the_same_tokens_alone_and_in_a_batch(bf16_trunk, mode: str,
                                                                                anchored: bool) -> None:
    ens, texts = bf16_trunk
    pairs = _pairs(texts, anchored, seed=5)
    batch = generate_pairs(ens, NAMES, mode, pairs, anchored=anchored)
    differ = [i for i, p in enumerate(pairs)
              if generate_pairs(ens, NAMES, mode, [p], anchored=anchored)[0].token_ids != batch[i].token_ids]
    assert differ == [], f"{len(differ)} of {len(pairs)} pairs changed with their batch: {differ}"


def test_cpu_kernel_workarounds_stay_off_other_devices(bf16) -> None:
    """Row padding and prompt alignment are CPU kernel workarounds: on another device (``meta`` stands in for a
    GPU here: shapes without data) a batch is as wide as its longest prompt and a lone row stays one row."""
    ens, texts = bf16
    assert pad_rows(torch.ones(2, 3, device="meta"), 0).shape == (2, 3)
    enc = encode_prompts(ens.tokenizer, texts[:3], 96, False, device="meta")
    longest = max(len(ens.tokenizer(t)["input_ids"]) for t in texts[:3])
    assert enc["input_ids"].shape[1] == longest
    assert encode_prompts(ens.tokenizer, texts[:3], 96, False)["input_ids"].shape[1] % PAD_MULTIPLE == 0

"""The LoRA bank's per-row mode (``emorl serve``'s running batch) on the tiny model: rows of every kind in any order
— one-hot adapters in unequal numbers, interleaved with base and mixed rows — each equal, bit for bit in float32 on
the CPU, to the same row alone in the mode ``generate`` uses for it (routed, base, weighted); in a prefill and in
a cached decode step. And the plan each forward shares between its layers, checked by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from emorl.config import load_config
from emorl.lora_bank import BASE_SLOT, RowPlan, lora_bank
from emorl.models import add_adapters, cache_kwarg, load_base, output_cache

NAMES = ["short", "long", "fluency"]


@pytest.fixture(scope="module")
def model() -> Any:
    cfg = load_config("tiny")
    peft = add_adapters(load_base(cfg.model), NAMES, cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    return peft


def _two_steps(model: Any, ids: torch.Tensor, bank_rows: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of a prefill of ``ids`` and of one cached decode step after it."""
    dec = model.base_model.model.get_decoder()
    with torch.inference_mode():
        if bank_rows is not None:
            bank_rows()
        out = dec(input_ids=ids, use_cache=True)
        pre = out.last_hidden_state
        if bank_rows is not None:
            bank_rows()
        nxt = torch.full((ids.shape[0], 1), 7)
        pos = torch.full((ids.shape[0], 1), ids.shape[1])
        step = dec(input_ids=nxt, position_ids=pos, use_cache=True, **{cache_kwarg(dec): output_cache(out)})
        return pre, step.last_hidden_state


def test_interleaved_rows_equal_each_row_alone(model: Any) -> None:
    # 12 rows: adapter 0 five times, adapter 1 once, adapter 2 twice, the base twice, two parameter mixes
    one = torch.eye(3)
    mix1, mix2 = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.1, 0.0, 0.3])
    coef = torch.stack([one[0], torch.zeros(3), mix1, one[1], one[0], one[2], mix2, one[0], torch.zeros(3), one[2],
                        one[0], one[0]])
    ids = torch.randint(0, 1000, (12, 12), generator=torch.Generator().manual_seed(1))
    with lora_bank(model, NAMES) as bank:
        pre, step = _two_steps(model, ids, lambda: bank.set_row_weights(coef))
        assert bank._row_plan(1, torch.device("cpu")).hot == (0, 1, 2)
    for r, w in enumerate(coef):
        if w.sum() == 0:  # the base (a lone base request: its slot has no delta)
            ctx = lora_bank(model, [BASE_SLOT])
        elif (w == 1).sum() == 1:  # one adapter: the routed form
            ctx = lora_bank(model, [NAMES[int(w.argmax())]])
        else:  # a parameter mix: the weighted form, one group
            ctx = lora_bank(model, NAMES, w[None])
        with ctx:
            lone_pre, lone_step = _two_steps(model, ids[r:r + 1])
        assert torch.equal(pre[r], lone_pre[0]), r
        assert torch.equal(step[r], lone_step[0]), r
    assert not torch.equal(step[0], step[1])  # the adapters change the rows


def test_with_autograd_the_rows_equal_the_inference_ones(model: Any) -> None:
    """With gradients on, the deltas are concatenated instead of written into the plan's buffer: same values."""
    coef = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(2))
    dec = model.base_model.model.get_decoder()
    with lora_bank(model, NAMES) as bank:
        bank.set_row_weights(coef)
        with torch.inference_mode():
            ref = dec(input_ids=ids).last_hidden_state
        with torch.enable_grad():
            bank.set_row_weights(coef)  # a plan (its coefficients) made outside inference mode
            h = dec(input_ids=ids).last_hidden_state
    assert torch.equal(h.detach(), ref)


def test_the_row_plan_by_hand() -> None:
    # rows: adapter 0, the base, a mix, adapter 0, adapter 1 (one position each)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    cpu = RowPlan(w, 1, torch.device("cpu"))
    assert cpu.hot == (0, 1)
    # CPU: each adapter's group padded to 4 rows (safe_rows(2)) by repeating its last row; the mix likewise
    assert cpu.one.tolist() == [0, 3, 3, 3, 4, 4, 4, 4] and cpu.mixed.tolist() == [2, 2, 2, 2]
    assert cpu.n_deltas == 13 and cpu.src.tolist() == [0, 12, 8, 1, 4]  # row 1 (the base) reads the zero row
    assert cpu.mixed_coef(2, torch.zeros(1)).tolist() == [[0.5, 0.5, 0.5, 0.5]] * 4
    meta = RowPlan(w, 1, torch.device("meta"))  # elsewhere: no padding beyond the longest group
    assert meta.one.shape[0] == 4 and meta.mixed.shape[0] == 1 and meta.n_deltas == 6
    two = RowPlan(w[:2], 3, torch.device("cpu"))  # 3 positions per row: flat (row, position) indices
    assert two.one.tolist() == [0, 1, 2, 2] and two.mixed is None and two.src.tolist() == [0, 1, 2, 4, 4, 4]
    a = RowPlan(torch.tensor([[1.0, 0.0]]), 1, torch.device("cpu"))
    assert a.src.tolist() == [0] and a.mixed is None


def test_kept_stacks_are_made_once_and_reused_bit_for_bit(model: Any) -> None:
    """``stacks=``: the first context stacks each layer's adapters into the caller's dict, a later one reuses the
    very tensors (no copy), and its rows equal a fresh bank's bit for bit (the serving runner re-enters the bank so
    after every idle period)."""
    coef = torch.stack([torch.eye(3)[1], torch.tensor([0.5, 0.2, 0.9]), torch.eye(3)[0]])
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(2))
    kept: dict[Any, Any] = {}
    with lora_bank(model, NAMES, stacks=kept) as bank:
        first = dict(bank._stacks)
    assert kept and all(v is not None for v in first.values())
    with lora_bank(model, NAMES, stacks=kept) as bank:
        assert all(bank._stacks[k] is first[k] for k in first)  # the same tensors: nothing stacked again
        reused = _two_steps(model, ids, lambda: bank.set_row_weights(coef))
    with lora_bank(model, NAMES) as bank:
        fresh = _two_steps(model, ids, lambda: bank.set_row_weights(coef))
    for a, b in zip(reused, fresh, strict=True):
        assert torch.equal(a, b)

"""The running batch's KV cache (serve.batch.RunningCache): keys and values equal transformers' DynamicCache's
after prefills, single steps and growth past a block; keys set from outside (filter, select) are taken over."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from emorl.serve.batch import KV_BLOCK, GrowingLayer, RunningCache


def _kv(rows: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, t, 4, generator=g), torch.randn(rows, 2, t, 4, generator=g)


def test_running_cache_equals_dynamic_cache_across_blocks() -> None:
    ours, ref = RunningCache(), DynamicCache()
    steps = [5] + [1] * (KV_BLOCK + 3) + [7]  # a prefill, steps past the first block, a chunk
    for i, t in enumerate(steps):
        for li in range(2):
            k, v = _kv(3, t, 10 * i + li)
            got, want = ours.update(k, v, li), ref.update(k, v, li)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    layer = ours.layers[0]
    assert isinstance(layer, GrowingLayer) and ours.get_seq_length() == sum(steps)
    # room for 5 + KV_BLOCK positions at the prefill; grown once, by the step to position 5 + KV_BLOCK + 1
    assert layer._kbuf is not None and layer._kbuf.shape[2] == 5 + KV_BLOCK + 1 + KV_BLOCK
    assert layer.keys.data_ptr() == layer._kbuf.data_ptr()  # a view: a step copies one position, not the cache


def test_keys_set_from_outside_are_taken_over() -> None:
    cache = RunningCache()
    k, v = _kv(4, 6, 0)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys[:2], layer.values[:2]  # the runner drops padding rows like this
    k2, v2 = _kv(2, 1, 1)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k[:2], k2], dim=2)) and torch.equal(values, torch.cat([v[:2], v2], dim=2))
    assert keys.shape == (2, 2, 7, 4) and layer._kbuf.shape[0] == 2

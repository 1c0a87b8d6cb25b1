"""The running batch's KV cache (serve.batch.RunningCache): keys and values equal transformers' DynamicCache's
after prefills, single steps and growth past a block; keys set from outside (filter, select) are taken over."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from emorl.serve.batch import KV_BLOCK, PAD_ALIGN, GrowingLayer, RunningBatch, RunningCache, Seq


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


def _batch(rows: list[int], length: int, pad: list[int], seed: int) -> RunningBatch:
    """A running batch of replies with ``rows[i]`` rows each, ``length`` positions, reply i's rows left-padded by
    ``pad[i]`` (two layers of random keys and values)."""
    seqs = [Seq(None, 0, None, "hidden", torch.zeros(r, 2), torch.ones(r), None) for r in rows]
    n = sum(rows)
    cache = RunningCache()
    for li in range(2):
        cache.update(*_kv(n, length, seed + li), li)
    mask = torch.ones(n, length, dtype=torch.long)
    r0 = 0
    for r, p in zip(rows, pad, strict=True):
        mask[r0:r0 + r, :p] = 0
        r0 += r
    return RunningBatch(seqs, cache, mask, torch.arange(n), torch.zeros(n, 2), torch.zeros(n, 8))


def test_join_and_retire_copy_each_layer_once_and_release_the_old() -> None:
    """concatenate = the two caches left-padded to one length and stacked; filter = the kept rows without the left
    padding they all have (whole PAD_ALIGN blocks). Both write into buffers with a block of room (the next step
    writes in place) and release the consumed batches' layers as they go (the flood's peak memory)."""
    a, b = _batch([2, 1], 5, [0, 1], 0), _batch([1], 8, [2], 10)
    want = [(torch.cat([torch.cat([torch.zeros(3, 2, 3, 4), la.keys], 2), lb.keys]),
             torch.cat([torch.cat([torch.zeros(3, 2, 3, 4), la.values], 2), lb.values]))
            for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)]
    want_mask = torch.cat([torch.cat([torch.zeros(3, 3, dtype=torch.long), a.mask], 1), b.mask])
    joined = a.concatenate(b)
    assert torch.equal(joined.mask, want_mask) and joined.n_rows == 4
    for layer, (k, v) in zip(joined.cache.layers, want, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert layer._owns_keys() and layer._kbuf.shape[2] == 8 + KV_BLOCK
    assert all(la.keys is None and la._kbuf is None for la in a.cache.layers + b.cache.layers)  # released
    ptr = joined.cache.layers[0]._kbuf.data_ptr()
    joined.cache.update(*_kv(4, 1, 99), 0)  # a decode step: in place
    assert joined.cache.layers[0]._kbuf.data_ptr() == ptr and joined.cache.layers[0].keys.shape[2] == 9

    wide = _batch([1, 2, 1], PAD_ALIGN + 4, [PAD_ALIGN + 1, PAD_ALIGN + 2, 0], 20)  # reply 2 retires
    keys = [layer.keys.clone() for layer in wide.cache.layers]
    kept = wide.filter([wide.seqs[0], wide.seqs[1]])
    assert kept is not None and kept.n_rows == 3 and kept.length == 4  # one whole block of padding trimmed
    for layer, k in zip(kept.cache.layers, keys, strict=True):
        assert torch.equal(layer.keys, k[:3, :, PAD_ALIGN:]) and layer._owns_keys()
    assert all(layer.keys is None for layer in wide.cache.layers)
    assert torch.equal(kept.mask, torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]))



FRAGMENT = """
import sys, torch
from emorl.serve.batch import trim_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
base = rss()
keep = []  # a running cache's life: buffers of changing sizes, each new one made before an old one is freed
for step in range(60):
    keep.append(torch.ones(int((1 + step % 13) * 2**20 / 4)))
    if len(keep) > 4:
        keep.pop(0)
small = [torch.ones(1000) for _ in range(2000)]  # small live objects allocated after them (requests, tokens)
keep.clear()
if sys.argv[1] == "1":
    assert trim_freed_memory()
print(rss() - base)
"""


def test_freed_kv_buffers_go_back_to_the_system() -> None:
    """After a join or a retire the step scheduler trims malloc's heap (serve.batch.trim_freed_memory): buffers of
    the running cache's sizes, allocated and freed as joins and retires do, leave tens of MB in glibc's fragmented
    heap; the trim gives them back. Each in a fresh process (glibc's own settings)."""
    import os
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc on Linux only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    grew = {v: float(subprocess.run([sys.executable, "-c", FRAGMENT, v], env=env, capture_output=True, text=True,
                                    check=True).stdout) for v in ("0", "1")}
    assert grew["1"] < grew["0"] - 15, grew

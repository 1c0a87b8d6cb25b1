"""The prompt-prefix cache of the step scheduler (emorl.serve.prefix): a prefill that starts after the shared system
prompt computes the same last hidden states and the same keys and values, bit for bit, as one that computes the
whole prompt — for every mode's rows, prompts of different lengths (so different alignments of the prefix), with and
without a shared trunk. Busy batches with the cache against ``generate`` alone: tests/test_serve_step.py's
joining-and-leaving test, which runs with the cache (the default) and checks that it was used.

By hand: SmolLM2's chat template renders ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{statement}
<|im_end|>\\n<|im_start|>assistant\\n``; everything up to the statement is the same for every request, so its keys
and values are computed once per stream (and per alignment: a prompt with 13 pads in front of it and one with 29
share an entry, 13 = 29 mod 16)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

from test_serve import STATEMENT, make_run  # noqa: E402
from test_serve_step import _job  # noqa: E402

from emorl.data import format_prompts  # noqa: E402
from emorl.serve import Engine  # noqa: E402
from emorl.serve.batch import trunk_layout  # noqa: E402
from emorl.serve.prefix import Plan, PrefixCache, align, shared_prefix  # noqa: E402
from emorl.serve.scheduler import StepScheduler  # noqa: E402

JOBS = [  # statement, weights, batch key: rows of every kind (one-hot, base, a params row's weights)
    ("Hi", [0.8, 0.5, 0.1], "hidden+base"),
    (STATEMENT, [0.2, 0.5, 0.3], "params"),
    ("Nobody calls me anymore and the evenings are long, so very long.", [0.2, 0.5, 0.3], "logits"),
    ("My cat is sick.", [1.0, 0.0, 0.0], "hidden"),
]


@pytest.fixture(scope="module", params=["all", "top:1"])
def step(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StepScheduler]:
    """A step scheduler over a tiny run (adapters on every layer, or on the top one: a shared trunk), driven from
    the test's thread (the engine is not started)."""
    engine = Engine(make_run(tmp_path_factory.mktemp("prefix"), layers=request.param), max_batch_rows=64,
                    max_tokens=400, kv_budget_mb=256)
    yield StepScheduler(engine)
    engine.close()


def prefill(step: StepScheduler, jobs: list[Any], cache: bool) -> tuple[Any, Any]:
    """Prefill ``jobs`` as one group with the prefix cache on or off: (the Prefill, its running batch)."""
    step.e.prefix_cache = cache
    step._prefix()
    step.runner.hold()
    try:
        step._start_prefill(jobs)
        pf, step.prefill = step.prefill, None
        while not step.runner.prefill_chunk(pf, 256):
            pass
        return pf, step.runner.finish_prefill(pf)
    finally:
        step.runner.release()
        step.e.prefix_cache = True


def jobs(step: StepScheduler, specs: list[tuple[str, list[float], str]]) -> list[Any]:
    return [_job(step.e, st, w, key, {}, str(i), max_new_tokens=4) for i, (st, w, key) in enumerate(specs)]


def test_the_shared_prefix_is_the_template_up_to_the_statement(step: StepScheduler) -> None:
    tok = step.e.ens.tokenizer
    prefix = shared_prefix(tok, "Be kind.")
    assert tok.decode(prefix) == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
    text = format_prompts(tok, ["Anything at all"], False, "Be kind.")[0]
    assert tok(text, add_special_tokens=False)["input_ids"][: len(prefix)] == prefix
    assert [align(n) for n in (1, 13, 16, 17, 29, 32)] == [1, 13, 16, 1, 13, 16]


def test_a_prefill_after_the_cached_prefix_equals_the_whole_prompts(step: StepScheduler) -> None:
    group = jobs(step, JOBS)
    pf_off, off = prefill(step, group, cache=False)
    computed = step.e.stats["prefix_computed_rows"]
    pf_on, on = prefill(step, jobs(step, JOBS), cache=True)
    assert pf_off.done == pf_on.ids.shape[1] and pf_on.done == pf_on.ids.shape[1]
    assert step.e.stats["prefix_computed_rows"] > computed  # entries made for this group's streams
    assert step.e.stats["prefix_reused_token_rows"] > 0
    assert torch.equal(on.h, off.h)
    first, _ = trunk_layout(on.seqs, on.mask.device)
    for la, lb in zip(on.cache.layers, off.cache.layers, strict=True):  # real positions (pads: zeros vs pad tokens)
        mask = on.mask if la.keys.shape[0] == on.n_rows else on.mask.index_select(0, first)  # a trunk layer
        real = mask.bool()[:, None, :, None]
        assert torch.equal(la.keys * real, lb.keys * real) and torch.equal(la.values * real, lb.values * real)
    # the same streams again: every entry reused, none computed; the same states
    computed = step.e.stats["prefix_computed_rows"]
    _, again = prefill(step, jobs(step, JOBS), cache=True)
    assert step.e.stats["prefix_computed_rows"] == computed
    assert torch.equal(again.h, off.h)


@pytest.mark.parametrize("spec", JOBS)
def test_each_prompt_alone_with_a_fresh_cache(step: StepScheduler, spec: tuple[str, list[float], str]) -> None:
    """Entries computed for one prompt alone (one alignment: the entries' forward is narrowest) hold its bits too."""
    cache = step._prefix()
    assert cache is not None
    cache.limit(0)  # empty
    _, off = prefill(step, jobs(step, [spec]), cache=False)
    pf, on = prefill(step, jobs(step, [spec]), cache=True)
    assert 0 < len(cache.entries) <= 4 and pf.ids.shape[1] % 16 == 0
    assert torch.equal(on.h, off.h)


def test_a_cache_too_small_for_one_group_evicts_and_still_reuses(step: StepScheduler) -> None:
    """With room for about one entry, a group's new entries evict the ones it found (a flood's small budget): the
    prefill keeps what it found and still equals the whole prompts' (this raised KeyError once)."""
    _, off = prefill(step, jobs(step, JOBS), cache=False)
    prefill(step, jobs(step, JOBS), cache=True)
    cache = step._prefix()
    assert cache is not None and len(cache.entries) >= 4
    entry = cache.bytes // len(cache.entries)
    old = step.e.kv_budget
    try:
        step.e.kv_budget = int(16 * 1.5 * entry)  # the cache's share: a 16th, so 1.5 entries
        for order in (JOBS, JOBS[::-1], JOBS):
            _, on = prefill(step, jobs(step, order), cache=True)
            assert cache.bytes <= 1.5 * entry and len(cache.entries) == 1
        assert torch.equal(on.h, off.h)
    finally:
        step.e.kv_budget = old


def test_a_prompt_without_the_prefix_is_prefilled_whole(step: StepScheduler) -> None:
    tok = step.e.ens.tokenizer
    group = jobs(step, JOBS[:2])
    group[1].pairs[0].text = format_prompts(tok, [STATEMENT], False, "Another system prompt.")[0]
    reused = step.e.stats["prefix_reused_token_rows"]
    pf, on = prefill(step, group, cache=True)
    assert step.e.stats["prefix_reused_token_rows"] == reused
    _, off = prefill(step, jobs(step, JOBS[:1]) + [group[1]], cache=False)
    assert torch.equal(on.h, off.h)


def test_entries_live_in_slots_and_the_oldest_unpinned_one_is_replaced() -> None:
    entry = 2 * 2 * 3 * 2 * 4  # 2 layers x (keys + values) x 3 positions x head_dim 2 x 4 bytes = 96
    cache = PrefixCache([1, 2, 3], max_bytes=3 * entry + 10, pad_id=0)  # 3 slots

    class Layer:
        keys = torch.arange(4 * 8 * 2, dtype=torch.float32).reshape(4, 1, 8, 2)  # 4 rows, 1 head, 8 positions
        values = -keys

    class Out:
        layers = [Layer(), Layer()]

    keys = [((float(i),), 1) for i in range(4)]
    fresh = cache.store(keys, Out())  # the 4th finds every slot taken by this plan: kept for it only
    assert len(fresh) == 4 and fresh[keys[3]].shape == (2, 2, 1, 3, 2)
    assert torch.equal(fresh[keys[3]][0, 0], Layer.keys[3, :, 1:4]) and torch.equal(fresh[keys[3]][1, 1],
                                                                                   -Layer.keys[3, :, 1:4])
    assert list(cache.entries) == keys[:3] and cache.bytes == 3 * entry
    cache.assemble(Plan([1], [keys[0]], 2), fresh, 8, 0, None)  # the plan is done: nothing pinned any more
    new = ((9.0,), 1)
    cache.store([new], Out())  # replaces the oldest entry, keys[0]
    assert list(cache.entries) == [keys[1], keys[2], new] and cache.bytes == 3 * entry
    held, missing = cache.take(Plan([1, 1], [keys[1], keys[0]], 2))
    assert list(held) == [keys[1]] and missing == [keys[0]]
    assert torch.equal(held[keys[1]][0, 0], Layer.keys[1, :, 1:4])  # its slot untouched by new's store
    cache.limit(2 * entry)  # another budget: a new, empty slab
    assert not cache.entries and cache.bytes == 0

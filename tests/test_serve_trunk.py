"""The step scheduler with a shared trunk (issue 24): a tiny run whose adapters sit on the top layer only, so layer 0
carries no LoRA delta and the runner computes it once per reply, not once per stream.

By hand: the tiny model has 2 decoder layers and adapters on layer 1 (``lora.layers: top:1``). A base-anchored mix
of 3 adapters has 4 rows; below layer 1 they would compute the same thing, so layer 0 runs one row per reply
(padded to a safe row count on the CPU) and its KV cache holds one row per reply, while layer 1 runs and stores
all 4. The replies must still be, token for token, what ``EnsembleModel.generate`` gives each request alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")

from test_serve import STATEMENT, make_run  # noqa: E402
from test_serve_step import _job, joining_and_leaving  # noqa: E402

from emorl.serve import Engine  # noqa: E402
from emorl.serve.runner import step_rows  # noqa: E402


@pytest.fixture(scope="module")
def trunk_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(make_run(tmp_path_factory.mktemp("serve-trunk"), layers="top:1"), max_batch_rows=64,
                    max_tokens=400)
    engine.start()
    yield engine
    engine.close()


def test_the_runner_shares_the_layers_below_every_adapter(trunk_engine: Engine) -> None:
    step = trunk_engine._step
    assert step.runner.trunk == 1 and step.trunk == 1
    # KV bytes: layer 0 holds one row per reply, layer 1 one per row (4 rows of a base-anchored K = 3 mix)
    per_layer = step.kv_per_row_token / 2
    assert step.kv_bytes(4, 1, 10) == int((4 * 1 + 1 * 1) * 10 * per_layer)
    job = _job(trunk_engine, STATEMENT, [0.5, 0.25, 1.0], "hidden+base", {}, "x", max_new_tokens=20)
    assert step.job_bytes(job) < step.job_rows(job) * step.job_worst_len(job) * step.kv_per_row_token


def test_joining_and_leaving_with_a_trunk_gets_the_lone_replies(trunk_engine: Engine) -> None:
    """The busy-batch check of test_serve_step.py, every mode, with the trunk: each reply equals `generate` alone
    (which shares the trunk too; tests/test_trunk.py shows that equals every stream through every layer). Layer 0
    computes one row per reply and the running cache's layer 0 holds one row per reply."""
    runner = trunk_engine._step.runner
    layers = trunk_engine.ens.stream.layers
    seen: list[tuple[int, int, int, int, int]] = []  # replies, rows, layer-0 rows, layer-1 rows, cache rows (0, 1)
    counts: dict[int, int] = {}
    hooks = [layer.register_forward_hook(
        lambda mod, args, out, i=i: counts.__setitem__(i, (out[0] if isinstance(out, tuple) else out).shape[0]))
        for i, layer in enumerate(layers)]
    step = runner.step

    def watched(batch: Any) -> None:
        step(batch)
        c = batch.cache.layers
        seen.append((len(batch.seqs), batch.n_rows, counts[0], counts[1], c[0].keys.shape[0] * 1000
                     + c[1].keys.shape[0]))

    runner.step = watched
    try:
        joining_and_leaving(trunk_engine)
    finally:
        runner.step = step
        for h in hooks:
            h.remove()
    assert seen and any(rows > replies for replies, rows, *_ in seen)  # mixes of several rows were in flight
    for replies, rows, l0, l1, cache in seen:
        assert l0 == step_rows(replies, torch.device("cpu"))  # the trunk: one row per reply (a safe count)
        assert l1 == step_rows(rows, torch.device("cpu"))
        assert cache == replies * 1000 + rows

"""The step scheduler of ``emorl serve`` on a tiny run: per-row LoRA coefficients equal the bank's other modes;
short requests finish before a long one that started earlier; requests that join and leave mid-batch get the reply
they get alone (= ``EnsembleModel.generate``); the KV budget and the bounded queue (429); whole conversations and
the prompt limit. No timing: order and equality only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import STATEMENT, Server, _wait, body, chat, make_run  # noqa: E402

from emorl.data import format_prompts  # noqa: E402
from emorl.ensemble.pairs import PairResult, PairSpec  # noqa: E402
from emorl.lora_bank import BASE_SLOT, lora_bank  # noqa: E402
from emorl.serve import Engine, create_app  # noqa: E402
from emorl.serve.engine import Job  # noqa: E402
from emorl.serve.protocol import ApiError, parse_messages  # noqa: E402
from emorl.serve.runner import step_rows  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    run = make_run(tmp_path_factory.mktemp("serve-step"))
    engine = Engine(run, max_batch_rows=64, max_tokens=400)
    server = Server(create_app(engine))
    yield {"run": run, "engine": engine, "url": server.url}
    server.stop()
    engine.close()


class Gate:
    """Slows or holds the decode thread's steps (a reply then cannot end before the test acts): no timing."""

    def __init__(self, engine: Engine, pause: float = 0.005) -> None:
        self.runner = engine._step.runner
        self.step, self.pause = self.runner.step, pause
        self.release = threading.Event()

    def __enter__(self) -> Gate:
        def slow(batch: Any) -> None:
            self.release.wait(self.pause)
            self.step(batch)

        self.runner.step = slow
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.runner.step = self.step


def no_eos(engine: Engine) -> Any:
    class NoEos:
        def __enter__(self) -> None:
            self.old, engine.ens.eos = engine.ens.eos, []

        def __exit__(self, *exc: Any) -> None:
            engine.ens.eos = self.old

    return NoEos()


# ------------------------------------------------------------------------------------------------ lora bank

def test_row_weights_equal_routed_weighted_and_base(served: dict[str, Any]) -> None:
    """Per-row coefficients: a one-hot row is its adapter (routed), a zero row the base, a weighted row the
    weighted form — bit for bit, so rows of every mode can share one forward."""
    ens = served["engine"].ens
    names = ens.names
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    lm = ens.stream.decoder
    w = torch.tensor([[0.5, 0.2, 0.9]])
    with torch.inference_mode():
        with lora_bank(ens.model, names + [BASE_SLOT]):  # routed: rows adapter-major, 4 per adapter + the base
            routed = lm(input_ids=ids.repeat(4, 1)).last_hidden_state.view(4, 4, 12, -1)
        with lora_bank(ens.model, names, w.expand(4, 3)):  # weighted: one group per row
            weighted = lm(input_ids=ids).last_hidden_state
        with lora_bank(ens.model, names) as bank:
            rows = torch.cat([torch.eye(3).repeat_interleave(4, 0), torch.zeros(4, 3), w.expand(4, 3)])
            bank.set_row_weights(rows)
            mixed = lm(input_ids=ids.repeat(5, 1)).last_hidden_state.view(5, 4, 12, -1)
    assert torch.equal(mixed[:4], routed)  # adapters 0-2 and the base
    assert torch.equal(mixed[4], weighted)
    assert not torch.equal(mixed[0], mixed[3])  # the adapters do change the rows


def test_step_row_padding_is_cpu_only() -> None:
    """The runner's row padding is a CPU kernel workaround (as lora_bank.pad_rows): on the CPU a 5-row step runs as
    8 rows, on another device as its own 5."""
    cpu, other = torch.device("cpu"), torch.device("meta")
    assert [step_rows(n, cpu) for n in (1, 4, 5, 7, 8, 9, 12, 13)] == [4, 4, 8, 8, 8, 12, 12, 13]
    assert [step_rows(n, other) for n in (1, 4, 5, 7, 8, 9, 12, 13)] == [1, 4, 5, 7, 8, 9, 12, 13]


# ------------------------------------------------------------------------------------------------ scheduling

def test_short_requests_finish_before_a_long_one_that_started_earlier(served: dict[str, Any]) -> None:
    engine, url = served["engine"], served["url"]
    order: list[str] = []
    first = threading.Event()

    def long() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                          json=body(max_tokens=300, temperature=1.0, seed=1, stream=True)) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 2:
                    first.set()
        order.append("long")

    def short(i: int) -> None:
        r = chat(url, body(max_tokens=8, temperature=0, emorl={"weights": [1, i, 0]}))
        assert r.status_code == 200
        order.append("short")

    with no_eos(engine), Gate(engine):
        t = threading.Thread(target=long)
        t.start()
        assert first.wait(60)
        shorts = [threading.Thread(target=short, args=(i,)) for i in range(4)]
        for s in shorts:
            s.start()
        for s in shorts:
            s.join(120)
        t.join(120)
    assert order == ["short"] * 4 + ["long"], order
    assert engine.stats["max_running_jobs"] >= 2  # they ran beside the long one, not after it


def _job(engine: Engine, statement: str, weights: list[float], key: str, out: dict, name: str,
         on_token: Any = None, **settings: Any) -> Job:
    text = format_prompts(engine.ens.tokenizer, [statement], False, None)[0]
    done = threading.Event()

    def emit(ev: tuple[str, Any, Any]) -> None:
        if ev[0] == "token" and on_token is not None:
            on_token()
        if ev[0] == "finish":
            out[name] = ev[2]
        if ev[0] in ("done", "error"):
            done.set()

    job = Job(key, [PairSpec(text, weights + [0.0], **settings)], emit, stream=True, prompt_tokens=40)
    job.done = done  # type: ignore[attr-defined]
    return job


def test_requests_joining_and_leaving_mid_batch_get_their_lone_replies(served: dict[str, Any]) -> None:
    """Requests admitted while others decode, and others retired around them, reproduce `generate` for each
    request alone (float32, CPU): modes hidden (anchored and convex), logits, probs, params, a single adapter and
    the base, greedy and sampled."""
    joining_and_leaving(served["engine"])


def joining_and_leaving(engine: Engine) -> None:
    """The check of the test above on any engine (tests/test_serve_trunk.py runs it with a shared trunk)."""
    ens = engine.ens
    specs = [  # name, statement, weights, batch key, generate's (mode, anchor), settings
        ("a", STATEMENT, [0.8, 0.5, 0.1], "hidden+base", ("hidden", "base"), dict(max_new_tokens=30)),
        ("b", "Hello", [1.0, 0.0, 0.0], "hidden", ("hidden", "none"), dict(max_new_tokens=5)),
        ("c", "My cat is sick.", [0.2, 0.5, 0.3], "logits", ("logits", "none"),
         dict(max_new_tokens=9, do_sample=True, temperature=1.3, top_k=5, seed=4)),
        ("d", "Nobody calls me.", [0.3, 0.3, 0.4], "probs", ("probs", "none"),
         dict(max_new_tokens=12, do_sample=True, seed=3)),
        ("e", STATEMENT, [0.8, 0.5, 0.1], "params", ("params", "base"), dict(max_new_tokens=7)),
        ("f", "I failed the exam again.", [0.0, 0.0, 0.0], "hidden+base", ("hidden", "base"),
         dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=5)),
    ]
    out: dict[str, PairResult] = {}
    jobs: dict[str, Job] = {}
    count = {"a": 0}

    def a_token() -> None:  # b and c join after a's 3rd token, d-f after its 10th (b has left by then)
        count["a"] += 1
        if count["a"] == 3:
            engine.submit(jobs["b"])
            engine.submit(jobs["c"])
        if count["a"] == 10:
            for n in "def":
                engine.submit(jobs[n])

    for name, st, w, key, _, kw in specs:
        jobs[name] = _job(engine, st, w, key, out, name, a_token if name == "a" else None, **kw)
    assert _wait(lambda: engine.pending() == 0)
    reused = engine.stats.get("prefix_reused_token_rows", 0)
    engine.submit(jobs["a"])
    for j in jobs.values():
        assert j.done.wait(60)  # type: ignore[attr-defined]
    assert _wait(lambda: engine.pending() == 0)
    assert engine.stats["max_running_jobs"] >= 3
    assert engine.stats["prefix_reused_token_rows"] > reused  # the prompt-prefix cache served these prefills
    for name, st, w, _, (mode, anchor), kw in specs:
        ref = ens.generate([st], w, mode=mode, anchor=anchor, **kw)
        assert out[name].token_ids == ref.token_ids[0, : int(ref.lengths[0])].tolist(), name
        assert out[name].text == ref.texts[0], name


def test_a_full_budget_queues_and_a_full_queue_answers_429(served: dict[str, Any]) -> None:
    engine, url = served["engine"], served["url"]
    step = engine._step
    req = body(max_tokens=300, temperature=0)
    one = step.job_rows(_job(engine, STATEMENT, [0.5, 0.25, 1.0], "hidden+base", {}, "x", max_new_tokens=300))
    old = engine.kv_budget, engine.max_queue
    # room for one such request (its rows x (prompt + 300)), not two; one may wait
    engine.kv_budget = int(1.5 * one * (64 + 300) * step.kv_per_row_token)
    engine.max_queue = 1
    results: dict[str, Any] = {}
    try:
        with no_eos(engine), Gate(engine, pause=30) as gate:
            first = threading.Thread(target=lambda: results.__setitem__("first", chat(url, req)))
            first.start()
            assert _wait(lambda: engine.stats["kv_bytes_reserved"] > 0 and not engine._queue)
            second = threading.Thread(target=lambda: results.__setitem__("second", chat(url, req)))
            second.start()
            assert _wait(lambda: len(engine._queue) == 1)  # waits: its worst case does not fit beside the first
            third = chat(url, req)
            assert third.status_code == 429, third.text
            assert third.headers["retry-after"] == "1"
            err = third.json()["error"]
            assert err["type"] == "rate_limit_error" and "--max-queue" in err["message"]
            too_big = chat(url, body(max_tokens=300, n=4, temperature=1.0))
            assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
            gate.release.set()
            first.join(60)
            second.join(60)
    finally:
        engine.kv_budget, engine.max_queue = old
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert results["first"].json()["choices"][0]["message"]["content"] == \
        results["second"].json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------------------ prompts

def test_conversations_drop_the_oldest_turns_first(served: dict[str, Any]) -> None:
    engine = served["engine"]
    tok = engine.request_tokenizer
    one = parse_messages([{"role": "user", "content": STATEMENT}], engine, 8)[0]
    assert one == format_prompts(tok, [STATEMENT], False, engine.ens.base.config.system_prompt)[0]
    msgs = [{"role": "user", "content": "first turn " * 20}, {"role": "assistant", "content": "a reply " * 20},
            {"role": "user", "content": "second turn"}, {"role": "assistant", "content": "another reply"},
            {"role": "tool", "content": "ignored"}, {"role": "user", "content": "the last message"}]
    whole, last, n_whole = parse_messages(msgs, engine, 8)
    assert last == "the last message"
    assert whole.index("first turn") < whole.index("second turn") < whole.index("the last message")
    assert "ignored" not in whole
    old = engine.prompt_limit
    try:
        engine.prompt_limit = n_whole - 10  # the first exchange must go, the rest fits
        cut, _, n_cut = parse_messages(msgs, engine, 8)
        assert "first turn" not in cut and "a reply" not in cut
        assert "second turn" in cut and "another reply" in cut and "the last message" in cut
        assert n_cut <= engine.prompt_limit
        engine.prompt_limit = 20  # not even the last message fits: refused, never cut
        with pytest.raises(ApiError, match="at most 20") as e:
            parse_messages(msgs, engine, 8)
        assert e.value.param == "messages"
    finally:
        engine.prompt_limit = old
    models = httpx.get(f"{served['url']}/v1/models").json()["data"]
    assert all("trained on single client statements" in m["emorl"]["note"] for m in models)
    assert "single client statements" in httpx.get(f"{served['url']}/v1/objectives").json()["note"]


def test_a_1000_token_prompt_fits_the_default_models_context(served: dict[str, Any]) -> None:
    """The limit is the model's context minus max_tokens, not the training setting (96 in the default preset)."""
    import json
    from types import SimpleNamespace

    from emorl.models import smollm2_dir

    try:
        context = json.loads((smollm2_dir() / "config.json").read_text())["max_position_embeddings"]
    except Exception as e:  # noqa: BLE001 - the default model may not be cached here
        pytest.skip(f"default model not available: {e}")
    engine = served["engine"]
    fake = SimpleNamespace(request_tokenizer=engine.request_tokenizer, ens=engine.ens, context=context,
                           prompt_limit=context - 1)
    statement = "I keep thinking about what happened. " * 140
    prompt, _, n_tok = parse_messages([{"role": "user", "content": statement}], fake, 256)
    assert n_tok > 1000 and statement.strip() in prompt
    assert engine.ens.base.config.max_prompt_tokens < 1000  # the training setting would have refused it


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(served: dict[str, Any]) -> None:
    """A prompt of several chunks does not stall a running reply: decode steps run between its chunks."""
    engine, url = served["engine"], served["url"]
    runner = engine._step.runner
    calls: list[str] = []
    chunk, step = runner.prefill_chunk, runner.step
    runner.prefill_chunk = lambda pf, n: (calls.append(f"prefill{pf.rows}"), chunk(pf, n))[1]
    runner.step = lambda batch: (calls.append("step"), step(batch))[1]
    old = engine.prefill_chunk
    engine.prefill_chunk = 16
    first = threading.Event()

    def running() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                          json=body(max_tokens=200, temperature=0, stream=True,
                                    emorl={"weights": [1, 0, 0], "anchor": "none"})) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 2:
                    first.set()

    try:
        with no_eos(engine), Gate(engine):
            t = threading.Thread(target=running)
            t.start()
            assert first.wait(60)
            calls.clear()
            long = chat(url, body(max_tokens=4, temperature=0, emorl={"weights": [0, 1, 0], "anchor": "none"},
                                  messages=[{"role": "user", "content": "I keep thinking about it. " * 12}]))
            assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] > 64
            t.join(120)
    finally:
        runner.prefill_chunk, runner.step = chunk, step
        engine.prefill_chunk = old
    pre = [i for i, c in enumerate(calls) if c.startswith("prefill")]
    assert len(pre) >= 4  # > 64 prompt tokens in chunks of 16
    assert all("step" in calls[a + 1:b] for a, b in zip(pre, pre[1:], strict=False))  # a decode step between chunks


def test_a_prefill_computes_at_most_max_prefill_tokens(served: dict[str, Any]) -> None:
    """`--max-prefill-tokens` bounds one prefill forward (the prompt's padded width x its rows): waiting requests
    over it wait for a later prefill group, and each still gets its lone reply; a lone request over it is prefilled
    in chunks of at most that many token-rows. By hand: a base-anchored K = 3 mix has 4 rows; its prompt (40 tokens)
    is padded to 48, so its prefill is 192 token-rows: a cap of 200 fits one such request, not two."""
    engine = served["engine"]
    ens = engine.ens
    runner = engine._step.runner
    chunks: list[tuple[int, int]] = []  # (rows, positions) of each prefill forward
    chunk = runner.prefill_chunk
    runner.prefill_chunk = lambda pf, n: (chunks.append((pf.rows, min(n, pf.ids.shape[1] - pf.done))),
                                          chunk(pf, n))[1]
    old = engine.max_prefill_tokens
    out: dict[str, PairResult] = {}
    weights = {"a": [0.8, 0.5, 0.1], "b": [0.2, 0.4, 0.6], "c": [1.0, 0.3, 0.3]}
    try:
        engine.prefix_cache = False  # whole prompts (with the cache a prefill starts after the system prompt)
        engine.max_prefill_tokens = 200
        jobs = {n: _job(engine, STATEMENT, w, "hidden+base", out, n, max_new_tokens=6) for n, w in weights.items()}
        with Gate(engine):
            for j in jobs.values():
                engine.submit(j)
            for j in jobs.values():
                assert j.done.wait(60)  # type: ignore[attr-defined]
        assert chunks and all(rows == 4 for rows, _ in chunks)  # one request per prefill group
        assert _wait(lambda: engine.pending() == 0)  # the engine idle: generate may use the model
        for n, w in weights.items():
            ref = ens.generate([STATEMENT], w, mode="hidden", anchor="base", max_new_tokens=6)
            assert out[n].token_ids == ref.token_ids[0, : int(ref.lengths[0])].tolist(), n
        chunks.clear()
        engine.max_prefill_tokens = 100  # below one request's 192: it runs alone, in chunks of 100 // 4 = 25
        lone = _job(engine, STATEMENT, weights["a"], "hidden+base", out, "lone", max_new_tokens=3)
        engine.submit(lone)
        assert lone.done.wait(60)  # type: ignore[attr-defined]
        assert len(chunks) >= 2 and all(rows * pos <= 100 for rows, pos in chunks), chunks
    finally:
        runner.prefill_chunk = chunk
        engine.max_prefill_tokens = old
        engine.prefix_cache = True
    assert _wait(lambda: engine.pending() == 0)


def test_requests_arriving_during_a_prefill_are_prefilled_before_the_next_step(served: dict[str, Any]) -> None:
    """A burst whose first request is already being prefilled: the rest, arriving during that prefill, are prefilled
    next, before the decode step, while the iteration's prefill stays within `--max-prefill-tokens`; each still gets
    its lone reply. By hand (no prefix cache): a base-anchored K = 3 request is 4 rows x 48 positions = 192
    token-rows; a cap of 400 leaves 208 after the first, so the second joins it before the step and the third
    (192 + 192 > 208) waits for the next iteration."""
    engine = served["engine"]
    ens = engine.ens
    runner = engine._step.runner
    calls: list[str] = []
    chunk, step = runner.prefill_chunk, runner.step
    out: dict[str, PairResult] = {}
    weights = {"a": [0.8, 0.5, 0.1], "b": [0.2, 0.4, 0.6], "c": [1.0, 0.3, 0.3]}
    jobs = {n: _job(engine, STATEMENT, w, "hidden+base", out, n, max_new_tokens=6) for n, w in weights.items()}

    def prefill(pf: Any, n: int) -> bool:
        calls.append(f"prefill{pf.rows}")
        if len(calls) == 1:  # b and c arrive while a is being prefilled
            engine.submit(jobs["b"])
            engine.submit(jobs["c"])
        return chunk(pf, n)

    old = engine.max_prefill_tokens
    assert _wait(lambda: engine.pending() == 0)
    try:
        runner.prefill_chunk = prefill
        runner.step = lambda batch: (calls.append("step"), step(batch))[1]
        engine.prefix_cache = False
        engine.max_prefill_tokens = 400
        engine.submit(jobs["a"])
        for j in jobs.values():
            assert j.done.wait(60)  # type: ignore[attr-defined]
    finally:
        runner.prefill_chunk, runner.step = chunk, step
        engine.max_prefill_tokens = old
        engine.prefix_cache = True
    assert calls[:4] == ["prefill4", "prefill4", "step", "prefill4"], calls
    assert _wait(lambda: engine.pending() == 0)
    for n, w in weights.items():
        ref = ens.generate([STATEMENT], w, mode="hidden", anchor="base", max_new_tokens=6)
        assert out[n].token_ids == ref.token_ids[0, : int(ref.lengths[0])].tolist(), n

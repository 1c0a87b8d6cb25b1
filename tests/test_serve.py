"""``emorl serve`` through the real HTTP stack (uvicorn on a loopback port) on a tiny run: OpenAI-shaped chat
completions (plain, streamed, n > 1) equal to ``EnsembleModel.generate`` for the same seed, whatever shares the
batch; every bad input is a 4xx naming the field; the API key; the official ``openai`` client; cancellation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from emorl.config import load_config  # noqa: E402
from emorl.data import format_prompts  # noqa: E402
from emorl.ensemble import EnsembleModel  # noqa: E402
from emorl.ensemble.pairs import PairSpec, generate_pairs  # noqa: E402
from emorl.models import AdapterInfo, add_adapters, load_base, save_adapter  # noqa: E402
from emorl.serve import Engine, create_app  # noqa: E402

OBJECTIVES = {"short": {"type": "length", "target": 3.0}, "long": {"type": "length", "target": 30.0},
              "fluency": {"type": "fluency"}}
NAMES = list(OBJECTIVES)
STATEMENT = "I lost my job today."
KEY = "test-key-123"


def make_run(root: Path, layers: str = "all") -> Path:
    """A run folder as training and search leave it: config, 3 adapters, a uniform baseline, a hidden search;
    ``layers``: the adapters' ``lora.layers``."""
    from emorl.search.store import adapter_identity

    run = root / "run"
    cfg = load_config("tiny")
    cfg.lora.layers = layers
    cfg.objectives = {k: dict(v) for k, v in OBJECTIVES.items()}
    cfg.eval.generation.max_new_tokens = 8
    cfg.save(run / "config.yaml")
    base = load_base(cfg.model)
    model = add_adapters(base, NAMES + ["uniform"], cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    for name in NAMES:
        save_adapter(model, name, run / "adapters" / name,
                     AdapterInfo(objective=name, rewards={name: OBJECTIVES[name]}, base=base.identity, steps=1))
    save_adapter(model, "uniform", run / "baselines" / "uniform",
                 AdapterInfo(objective="+".join(NAMES), strategy="uniform", objectives=NAMES, rewards=OBJECTIVES,
                             base=base.identity, steps=1))
    folder = run / "search" / "hidden"
    folder.mkdir(parents=True)
    best = {"method": "hierarchical", "names": NAMES, "weights": dict(zip(NAMES, [0.5, 0.25, 1.0], strict=True)),
            "weight_vector": [0.5, 0.25, 1.0], "aggregate": 0.4, "scores": {"short": 0.5, "long": 0.2, "fluency": 0.5},
            "mode": "hidden", "anchor": "base", "adapters": {n: adapter_identity(run / "adapters" / n) for n in NAMES}}
    (folder / "best.json").write_text(json.dumps(best))
    rows = [{"kind": "header", "names": NAMES}] + [
        {"weights": w, "aggregate": a, "scores": dict(zip(NAMES, s, strict=True))}
        for w, a, s in [([1, 0, 0], 0.3, [0.6, 0.1, 0.2]), ([0, 1, 0], 0.2, [0.1, 0.4, 0.1]),
                        ([0.5, 0.25, 1.0], 0.4, [0.5, 0.2, 0.5])]]
    (folder / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    run = make_run(tmp_path_factory.mktemp("serve"))
    engine = Engine(run, max_batch_rows=64, max_wait_ms=5, max_tokens=400)
    open_server = Server(create_app(engine))
    keyed = Server(create_app(engine, api_key=KEY, max_body_bytes=64 * 1024, manage_engine=False))
    yield {"run": run, "engine": engine, "url": open_server.url, "key_url": keyed.url}
    keyed.stop()
    open_server.stop()
    engine.close()


@pytest.fixture(scope="module")
def served_window(served: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The first design (--scheduler window) on the same run: the batching-window tests."""
    engine = Engine(served["run"], max_batch_rows=64, max_wait_ms=5, max_tokens=400, scheduler="window",
                    base=served["engine"].ens.base)  # one model: the tests use one engine at a time
    server = Server(create_app(engine))
    yield {"run": served["run"], "engine": engine, "url": server.url}
    server.stop()
    engine.close()


def chat(url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kw)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "emorl", "messages": [{"role": "user", "content": STATEMENT}], **kw}


def reference(engine: Engine, weights: list[float], statement: str = STATEMENT, n: int = 1, **kw: Any) -> list[str]:
    """What `emorl generate` decodes for this statement (once the scheduler is idle: the model is not shared)."""
    assert _wait(lambda: engine.pending() == 0)
    res = engine.ens.generate([statement] * n, weights, **kw)
    return list(res.texts)


def sse_events(text: str) -> list[Any]:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ------------------------------------------------------------------------------------------------ engine level

@pytest.mark.parametrize(("mode", "anchor"), [("hidden", "base"), ("hidden", "none"), ("logits", "base"),
                                              ("probs", "none"), ("params", "base"), ("params", "none")])
def test_pairs_decode_equals_generate_per_pair(served: dict[str, Any], mode: str, anchor: str) -> None:
    ens = served["engine"].ens
    prompts = [STATEMENT, "My cat is sick and I do not know what to do anymore.", "Hello", STATEMENT]
    weights = [[0.8, 0.5, 0.1], [1, 0, 0], [0.2, 0.9, 0.4], [0, 0.3, 1]]
    settings = [dict(max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, seed=3),
                dict(max_new_tokens=4), dict(max_new_tokens=9, do_sample=True, top_k=5, temperature=1.3, seed=4),
                dict(max_new_tokens=6, do_sample=True, seed=3)]
    pairs, refs = [], []
    for p, w, s in zip(prompts, weights, settings, strict=True):
        r = ens.generate([p], w, mode=mode, anchor=anchor, **s)
        refs.append(r.token_ids[0, : r.lengths[0]].tolist())
        pairs.append(PairSpec(format_prompts(ens.tokenizer, [p], False, None)[0], r.weights[0].tolist(), **s))
    base_stream = anchor == "base" and mode != "params"  # none of these points sums to 1
    out = generate_pairs(ens, ens.names, mode, pairs, anchored=base_stream)
    # token for token, up to float rounding: a batch of another shape rounds the backbone's matmuls differently on
    # some CPUs, and the tiny random model's near-uniform next-token distribution (~2e-5 per token) puts sampled
    # draws close to a token boundary, so a rare draw can flip (seen once in probs mode). Greedy rows always agree.
    same = [o.token_ids == r for o, r in zip(out, refs, strict=True)]
    assert same[1] and sum(same) >= 3, (same, [o.token_ids for o in out], refs)
    assert all(o.token_ids[:4] == r[:4] for o, r in zip(out, refs, strict=True))
    assert [len(o.token_ids) for o in out] == [7, 4, 9, 6]  # the tiny model never emits EOS in a few steps
    assert all(o.finish_reason == "length" for o in out)


# ------------------------------------------------------------------------------------------------ API

def test_models_objectives_health_and_page(served: dict[str, Any]) -> None:
    url = served["url"]
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ids == ["soups", "soups-avg", "logits", "probs", "emorl", "emorl-convex", "uniform", "single:short",
                   "single:long", "single:fluency", "base"]
    obj = httpx.get(f"{url}/v1/objectives").json()
    assert obj["objectives"] == NAMES and obj["adapters"] == NAMES + ["uniform"]
    assert obj["searched"]["hidden"]["weights"] == {"short": 0.5, "long": 0.25, "fluency": 1.0}
    assert [p["weights"]["short"] for p in obj["points"]["hidden"]] == [1, 0, 0.5]
    assert obj["front"] is None
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "drawFront" in httpx.get(f"{url}/static/app.js").text


def test_chat_completion_equals_generate(served: dict[str, Any]) -> None:
    engine = served["engine"]
    r = chat(served["url"], body(max_tokens=6, temperature=0,
                                 emorl={"weights": {"short": 2, "long": 1, "fluency": 1}, "anchor": "none"}))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "emorl"
    assert out["emorl"]["weights"] == {"short": 0.5, "long": 0.25, "fluency": 0.25}  # convex: rescaled to sum 1
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == reference(engine, [2, 1, 1], max_new_tokens=6, anchor="none")[0]
    assert out["usage"]["completion_tokens"] == 6
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 6
    # no weights: the searched ones (base-anchored, as given); a one-policy model: that adapter alone, as
    # `emorl evaluate` decodes it; the base: the anchored point w = 0
    searched = chat(served["url"], body(max_tokens=5, temperature=0.9, seed=2)).json()
    assert searched["emorl"]["anchor"] == "base" and searched["emorl"]["weights"]["fluency"] == 1.0
    assert searched["choices"][0]["message"]["content"] == reference(
        engine, [0.5, 0.25, 1.0], max_new_tokens=5, do_sample=True, temperature=0.9, top_k=50, seed=2)[0]
    uni = chat(served["url"], body(model="uniform", max_tokens=5, temperature=0)).json()
    alone = EnsembleModel(engine.ens.base, {"uniform": served["run"] / "baselines" / "uniform"})
    assert uni["choices"][0]["message"]["content"] == alone.generate([STATEMENT], [1.0], max_new_tokens=5).texts[0]
    base = chat(served["url"], body(model="base", max_tokens=5, temperature=0.8, seed=4)).json()
    assert _wait(lambda: engine.pending() == 0)
    ref = alone.generate([STATEMENT], [0.0], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=50, seed=4)
    assert base["choices"][0]["message"]["content"] == ref.texts[0]
    assert base["choices"][0]["message"]["content"] != uni["choices"][0]["message"]["content"]


def test_stream_and_n_choices(served: dict[str, Any]) -> None:
    engine = served["engine"]
    req = body(max_tokens=7, temperature=0.8, top_p=0.95, seed=11, n=3,
               emorl={"weights": [0.2, 0.5, 0.3], "mode": "logits", "anchor": "none"},
               stream_options={"include_usage": True})
    plain = chat(served["url"], req).json()
    texts = [c["message"]["content"] for c in plain["choices"]]
    ref = reference(engine, [0.2, 0.5, 0.3], n=3, mode="logits", anchor="none", max_new_tokens=7, do_sample=True,
                    temperature=0.8, top_p=0.95, top_k=50, seed=11)
    assert texts == ref and len(set(texts)) == 3  # choice j = row j of generate([statement] * n)
    streamed = chat(served["url"], {**req, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["delta"]["role"] for c in chunks[0]["choices"]] == ["assistant"] * 3
    got = ["", "", ""]
    finish = {}
    for c in chunks[1:-1]:
        (ch,) = c["choices"]
        got[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert got == texts and finish == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 21


def test_concurrent_requests_share_one_batch_and_match_generate(served_window: dict[str, Any]) -> None:
    """4 requests with different weights, sampling settings, lengths and seeds decode in one batch, and each reply
    is what generate gives for that request alone."""
    served = served_window
    engine = served["engine"]
    convex = "none"
    reqs = [({"weights": [0.8, 0.5, 0.1], "anchor": convex}, dict(max_tokens=6, temperature=0.7, seed=1),
             "I lost my job today."),
            ({"weights": [1, 0, 0], "anchor": convex}, dict(max_tokens=3, temperature=0), "My cat is sick."),
            ({"weights": {"short": 0, "long": 1, "fluency": 2}, "anchor": convex},
             dict(max_tokens=8, temperature=1.2, top_p=0.9, seed=7), "Nobody calls me."),
            ({"weights": [0.3, 0.3, 0.3], "anchor": convex}, dict(max_tokens=5, temperature=1.0, seed=1, stop=["zz"]),
             "I failed the exam again.")]
    assert _wait(lambda: engine.pending() == 0)  # the previous test's last batch has updated its stats
    batches = engine.stats["batches"]
    engine.max_wait_s = engine.max_gap_s = 1.0  # a window wide enough for all four to arrive
    replies: dict[int, Any] = {}

    def send(i: int) -> None:
        ext, kw, statement = reqs[i]
        replies[i] = chat(served["url"], {"model": "emorl", "messages": [{"role": "user", "content": statement}],
                                          "emorl": ext, **kw}).json()

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.max_wait_s = engine.max_gap_s = 0.005
    assert _wait(lambda: engine.pending() == 0)  # replies go out as they finish, the batch's stats after it
    assert engine.stats["batches"] == batches + 1, replies
    assert engine.stats["last_batch"]["jobs"] == 4 and engine.stats["last_batch"]["pairs"] == 4
    for i, (ext, kw, statement) in enumerate(reqs):
        w = ext["weights"] if isinstance(ext["weights"], list) else [ext["weights"][n] for n in NAMES]
        sample = kw["temperature"] > 0
        ref = reference(engine, w, statement, anchor="none", max_new_tokens=kw["max_tokens"], do_sample=sample,
                        temperature=kw["temperature"] if sample else 1.0, top_p=kw.get("top_p", 1.0),
                        top_k=50 if sample else 0, seed=kw.get("seed"), stop=kw.get("stop"))[0]
        assert replies[i]["choices"][0]["message"]["content"] == ref, i


def test_a_burst_shares_a_batch_while_requests_keep_coming(served_window: dict[str, Any]) -> None:
    """Requests that keep arriving (each sent once the previous one is queued) join one batch while the gap rule
    keeps the window open; with a short gap, a request that arrives after the first one's batch started (an
    event, not a delay) gets a batch of its own: the window closed by the gap rule, long before max_wait."""
    served = served_window
    engine = served["engine"]

    def burst(gap_s: float) -> int:
        assert _wait(lambda: engine.pending() == 0)
        batches = engine.stats["batches"]
        engine.max_wait_s, engine.max_gap_s = 60.0, gap_s
        threads = []
        try:
            for i in range(3):
                threads.append(threading.Thread(target=chat, args=(served["url"], body(max_tokens=2))))
                threads[-1].start()
                if gap_s < 1:  # the next one arrives once the first one's batch has started (the gap closed it)
                    assert _wait(lambda: engine.stats["batches"] > batches or engine._busy, 30)
                else:  # the next one arrives once this one waits in the queue (within the gap)
                    assert _wait(lambda n=i + 1: len(engine._queue) == n, 30)
            for t in threads:
                t.join(60)
        finally:
            engine.max_wait_s = engine.max_gap_s = 0.005
        assert _wait(lambda: engine.pending() == 0)
        return engine.stats["batches"] - batches

    assert burst(3.0) == 1
    assert burst(0.02) >= 2


def test_a_request_that_waited_through_a_batch_gets_its_window_after_it(served_window: dict[str, Any]) -> None:
    """A request queued while a batch decodes, and one sent just after that batch ends (a closed-loop client whose
    reply finished with it), share the next batch: the window opens when the batch ends, not at the first one's
    arrival (by then longer ago than max_wait). The first batch is held until the queued request is past its window."""
    served = served_window
    engine = served["engine"]
    url = served["url"]
    assert _wait(lambda: engine.pending() == 0)
    release, sizes = threading.Event(), []
    window = engine._window
    decode = window.decode

    def held(batch: list[Any]) -> None:
        sizes.append(len(batch))
        if len(sizes) == 1:
            release.wait(30)
        decode(batch)

    def long_then_next() -> None:
        chat(url, body(max_tokens=2, seed=1))  # returns when the held batch ends
        chat(url, body(max_tokens=2, seed=3))

    window.decode = held
    engine.max_wait_s = engine.max_gap_s = 1.5
    try:
        closed = threading.Thread(target=long_then_next)
        closed.start()
        assert _wait(lambda: len(sizes) == 1)
        early = threading.Thread(target=chat, args=(url, body(max_tokens=2, seed=2)))
        early.start()  # queued while the first batch decodes
        assert _wait(lambda: len(engine._queue) == 1)
        engine._queue[0].submitted -= engine.max_wait_s + 1.0  # its own window (from its arrival) is over
        release.set()
        closed.join(60)
        early.join(60)
        assert _wait(lambda: engine.pending() == 0)
        assert sizes == [1, 2]  # the held one, then early + next together (before: [1, 1, 1])
    finally:
        release.set()
        del window.decode
        engine.max_wait_s = engine.max_gap_s = 0.005


BAD = [
    ({"emorl": {"weights": [1, 2]}}, 400, "emorl.weights", "3 objectives"),
    ({"emorl": {"weights": {"short": 1, "long": 1, "fluncy": 1}}}, 400, "emorl.weights", "unknown objective"),
    ({"emorl": {"weights": {"short": 1, "long": 1}}}, 400, "emorl.weights", "no weight for ['fluency']"),
    ({"emorl": {"weights": [1, -0.5, 0]}}, 400, "emorl.weights", ">= 0"),
    ({"emorl": {"weights": [0, 0, 0], "anchor": "none"}}, 400, "emorl.weights", "all weights are zero"),
    ({"emorl": {"weights": [1, 0, 0], "anchor": "convex"}}, 400, "emorl.anchor", "choose 'base'"),
    ({"model": "emorl-convex", "emorl": {"anchor": "base"}}, 400, "emorl.anchor", "is anchor 'none'"),
    ({"emorl": {"weights": [1, "a", 0]}}, 400, "emorl.weights", "expected a number"),
    ({"emorl": {"weights": [1, 0, 0], "mode": "hiden"}}, 400, "emorl.mode", "choose one of"),
    ({"emorl": {"weights": [1, 0, 0], "temperature": 1}}, 400, "emorl", "unknown field"),
    ({"emorl": {"mode": "params"}}, 400, "emorl.weights", "no searched weights for mode 'params'"),
    ({"model": "soups", "emorl": {"weights": [1, 0, 0], "mode": "hidden"}}, 400, "emorl.mode", "is mode 'params'"),
    ({"model": "uniform", "emorl": {"weights": [1, 0, 0]}}, 400, "emorl.weights", "one trained policy"),
    ({"model": "gpt-4"}, 404, "model", "not served by this run"),
    ({"model": None}, 400, "model", "required"),
    ({"max_tokens": 500}, 400, "max_tokens", "--max-tokens"),
    ({"max_tokens": 0}, 400, "max_tokens", "out of range"),
    ({"temperature": 3}, 400, "temperature", "out of range"),
    ({"top_p": 0}, 400, "top_p", "out of range"),
    ({"n": 17}, 400, "n", "out of range"),
    ({"seed": -1}, 400, "seed", "out of range"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"stream": "yes"}, 400, "stream", "true or false"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "user message"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "expected a string"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", "the model's context of 512"),
]


@pytest.mark.parametrize(("patch", "status", "param", "words"), BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(served: dict[str, Any], patch: dict, status: int, param: str,
                                             words: str) -> None:
    r = chat(served["url"], {**body(), **patch})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_malformed_nan_and_oversized_bodies(served: dict[str, Any]) -> None:
    url = served["url"]
    headers = {"Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "emorl", "messages": [', headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    nan = b'{"model": "emorl", "messages": [{"role": "user", "content": "hi"}], "emorl": {"weights": [1, NaN, 0]}}'
    r = httpx.post(f"{url}/v1/chat/completions", content=nan, headers=headers)
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2]", headers=headers)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    big = json.dumps(body(user="x" * 70_000)).encode()  # the keyed server's limit: 64 KiB
    r = httpx.post(f"{served['key_url']}/v1/chat/completions", content=big,
                   headers={**headers, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and "routes" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_score_endpoint(served: dict[str, Any]) -> None:
    r = httpx.post(f"{served['url']}/v1/score", json={"pairs": [{"statement": STATEMENT,
                                                                 "reply": "That sounds very hard."}]}, timeout=60)
    assert r.status_code == 200, r.text
    s = r.json()["scores"][0]
    assert s["short"] == pytest.approx(1 / 1.01)  # 4 words, target 3, tolerance 10
    assert s["long"] == pytest.approx(1 / (1 + 2.6**2))  # target 30
    assert 0 <= s["fluency"] <= 1
    bad = httpx.post(f"{served['url']}/v1/score", json={"pairs": [{"statement": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pairs[0]"


def test_api_key(served: dict[str, Any]) -> None:
    url = served["key_url"]
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200  # the page's files hold no run data; the page asks for the key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert chat(url, body(max_tokens=2), headers=headers).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_official_openai_client(served: dict[str, Any]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served['key_url']}/v1", api_key=KEY)
    ext = {"emorl": {"weights": {"short": 0.2, "long": 0.7, "fluency": 0.1}, "anchor": "none"}}
    out = client.chat.completions.create(model="emorl", messages=[{"role": "user", "content": STATEMENT}],
                                         max_tokens=6, temperature=0.9, seed=5, extra_body=ext)
    ref = reference(served["engine"], [0.2, 0.7, 0.1], anchor="none", max_new_tokens=6, do_sample=True,
                    temperature=0.9, top_k=50, seed=5)[0]
    assert out.choices[0].message.content == ref
    assert out.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="emorl", messages=[{"role": "user", "content": STATEMENT}],
                                            max_tokens=6, temperature=0.9, seed=5, extra_body=ext, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref
    assert "emorl" in [m.id for m in client.models.list()]
    with pytest.raises(openai.BadRequestError, match="emorl.weights"):
        client.chat.completions.create(model="emorl", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"emorl": {"weights": [1]}})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served['key_url']}/v1", api_key="nope").models.list()


def _wait(cond: Any, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_disconnected_requests_are_cancelled(served: dict[str, Any]) -> None:
    """Step scheduler: a client that hangs up (streamed or plain) frees its rows at the next step; one that leaves
    while it waits is dropped before it starts."""
    engine = served["engine"]
    url = served["url"]
    runner = engine._step.runner
    step, gate = runner.step, threading.Event()

    def slow(batch: Any) -> None:  # every step waits a little (or until released): the reply cannot end first
        gate.wait(0.01)
        step(batch)

    old_eos = engine.ens.eos
    engine.ens.eos = []
    runner.step = slow
    try:
        long = body(max_tokens=400, temperature=1.0, seed=1)
        st = engine.stats
        c0 = st["cancelled"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long, "stream": True}, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break
        assert _wait(lambda: st["cancelled"] == c0 + 1 and engine.pending() == 0), st
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=long, timeout=1.0)
        assert _wait(lambda: st["cancelled"] == c0 + 2 and engine.pending() == 0), st
        # waiting while the decode thread is inside a step: gone before it starts
        blocked = threading.Event()

        def held(batch: Any) -> None:
            blocked.set()
            gate.wait(30)
            step(batch)

        runner.step = held
        first = threading.Thread(target=lambda: chat(url, {**long, "max_tokens": 3}))
        first.start()
        assert blocked.wait(30)
        d0 = st["dropped_before_start"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=long, timeout=0.5)
        gate.set()
        first.join(30)
        assert _wait(lambda: st["dropped_before_start"] == d0 + 1 and engine.pending() == 0), st
    finally:
        gate.set()
        runner.step = step
        engine.ens.eos = old_eos
    ok = chat(url, body(max_tokens=3, temperature=0))  # the server still serves
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_disconnected_requests_are_cancelled_window(served_window: dict[str, Any]) -> None:
    served = served_window
    engine = served["engine"]
    url = served["url"]
    old_eos = engine.ens.eos
    engine.ens.eos = []  # no early end: 400 tokens take far longer than a hang-up takes to notice
    try:
        long = body(max_tokens=400, temperature=1.0, seed=1)
        st = engine.stats
        c0 = st["cancelled"]
        # streamed: read a few chunks, hang up; the job ends at the next step
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**long, "stream": True}, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break
        assert _wait(lambda: st["cancelled"] == c0 + 1 and engine.pending() == 0), st
        assert st["last_batch"]["tokens"] < 400  # it ended at a step soon after the hang-up, not at max_tokens
        # plain: the client times out while it decodes
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=long, timeout=1.0)
        assert _wait(lambda: st["cancelled"] == c0 + 2 and engine.pending() == 0), st
        # dropped before its batch starts: gone while the batching window is still open
        engine.max_wait_s = engine.max_gap_s = 3.0
        d0 = st["dropped_before_start"]
        batches = st["batches"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=long, timeout=0.5)
        assert _wait(lambda: st["dropped_before_start"] == d0 + 1)
        assert st["batches"] == batches
    finally:
        engine.max_wait_s = engine.max_gap_s = 0.005
        engine.ens.eos = old_eos
    ok = chat(url, body(max_tokens=3, temperature=0))  # the server still serves
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_cli_serves_and_stops_cleanly_on_ctrl_c(served: dict[str, Any]) -> None:
    """`emorl serve` as a process: prints the URL, answers, and Ctrl-C (SIGINT; SIGTERM takes the same handler)
    during a streamed reply ends it cleanly: the server says it drains, the reply still decoding when the grace
    ends is cancelled at the next step (finish_reason "cancelled", then [DONE]), exit status 0, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "emorl.cli", "serve", "--run", str(served["run"]), "--port", str(port),
           "--max-tokens", "400", "--grace-s", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait(lambda: _up(url), 120), "the server did not start"
        got: list[str] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                                  json=body(max_tokens=400, temperature=1.0, seed=1, stream=True,
                                            stop=["never-seen"])) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except httpx.HTTPError as e:
                got.append(f"closed: {type(e).__name__}")

        t = threading.Thread(target=stream)
        t.start()
        assert _wait(lambda: any('"content"' in x for x in got), 60), got  # the reply is decoding
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)  # a bounded wait: the drain must end the process by itself
        t.join(30)
        assert proc.returncode == 0, out
        assert "in-flight requests have 0 s to finish" in out, out
        assert f"at http://127.0.0.1:{port}/" in out and "Traceback" not in out
        assert not t.is_alive()
        lines = [x for x in got if x]
        assert lines[-1] == "data: [DONE]", got[-3:]
        finishes = [c.get("finish_reason") for x in lines if x.startswith("data: {")
                    for c in json.loads(x[6:]).get("choices") or [] if c.get("finish_reason")]
        assert finishes == ["cancelled"], (finishes, out[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_stop_strings_cut_plain_and_streamed_replies(served: dict[str, Any]) -> None:
    engine = served["engine"]
    req = body(max_tokens=12, temperature=0, emorl={"weights": [0.3, 0.6, 0.1], "anchor": "none"})
    free = chat(served["url"], req).json()["choices"][0]["message"]["content"]
    assert len(free) >= 12, free
    stop = free[len(free) // 2: len(free) // 2 + 3]  # a piece of its middle: the reply must end just before it
    cut = free[: free.find(stop)].strip()
    assert 0 < len(cut) < len(free)
    out = chat(served["url"], {**req, "stop": [stop, "never-seen"]}).json()
    assert out["choices"][0]["message"]["content"] == cut
    assert out["choices"][0]["finish_reason"] == "stop"
    ref = reference(engine, [0.3, 0.6, 0.1], anchor="none", max_new_tokens=12, stop=[stop, "never-seen"])[0]
    assert ref == cut
    events = sse_events(chat(served["url"], {**req, "stop": [stop, "never-seen"], "stream": True}).text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in events[1:-1] if c["choices"])
    assert text == cut
    assert [c["choices"][0]["finish_reason"] for c in events[1:-1]][-1] == "stop"


def test_base_anchored_requests_and_the_base_share_one_batch(served_window: dict[str, Any]) -> None:
    """Base-anchored points not summing to 1 and the base model itself need the base stream: one batch for all."""
    served = served_window
    engine = served["engine"]
    reqs = [body(emorl={"weights": [0.8, 0.5, 0.1]}, max_tokens=5, temperature=0.8, seed=3),
            body(emorl={"weights": [0, 1, 2]}, max_tokens=4, temperature=0),
            body(model="base", max_tokens=6, temperature=1.0, seed=3)]
    replies: dict[int, Any] = {}
    assert _wait(lambda: engine.pending() == 0)  # the previous test's last batch has updated its stats
    batches = engine.stats["batches"]
    engine.max_wait_s = engine.max_gap_s = 1.0
    try:
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, chat(served["url"], reqs[i]).json()))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.max_wait_s = engine.max_gap_s = 0.005
    assert _wait(lambda: engine.pending() == 0)
    assert engine.stats["batches"] == batches + 1, (engine.stats, replies)
    assert engine.stats["last_batch"]["key"] == "hidden+base" and engine.stats["last_batch"]["jobs"] == 3
    refs = [reference(engine, [0.8, 0.5, 0.1], max_new_tokens=5, do_sample=True, temperature=0.8, top_k=50, seed=3),
            reference(engine, [0, 1, 2], max_new_tokens=4),
            reference(engine, [0, 0, 0], max_new_tokens=6, do_sample=True, temperature=1.0, top_k=50, seed=3)]
    assert [replies[i]["choices"][0]["message"]["content"] for i in range(3)] == [r[0] for r in refs]


def test_auto_weights_follow_the_router(served: dict[str, Any]) -> None:
    """`"weights": "auto"` asks the run's router for the statement's weights (base-anchored, in the box): refused with a
    clear 400 while the run has none; once fitted, the reply carries the chosen weights and equals `generate`."""
    run, engine, url = served["run"], served["engine"], served["url"]
    r = chat(url, body(emorl={"weights": "auto"}, seed=3))
    assert r.status_code == 400 and r.json()["error"]["param"] == "emorl.weights"
    assert "router" in r.json()["error"]["message"]
    from emorl.router.run import fit_run

    cfg = load_config(str(run / "config.yaml"), ["route.prompts=6", "route.step=0.5"])
    assert _wait(lambda: engine.pending() == 0)
    fit_run(run, cfg, base=engine.ens.base, ens=engine.ens)
    engine.worker.forget_router()
    r = chat(url, body(emorl={"weights": "auto"}, seed=3, temperature=1.0, max_tokens=8))
    assert r.status_code == 200, r.text
    chosen = r.json()["emorl"]["weights"]
    w = [chosen[n] for n in NAMES]
    assert max(w) <= engine.cfg.search.w_max and w == pytest.approx(engine.route(STATEMENT))
    ref = reference(engine, w, anchor="base", do_sample=True, seed=3, max_new_tokens=8, temperature=1.0,
                    top_k=engine.cfg.eval.generation.top_k, top_p=engine.cfg.eval.generation.top_p)
    assert r.json()["choices"][0]["message"]["content"] == ref[0]

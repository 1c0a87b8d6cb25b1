"""The ``llm-judge`` reward against a real OpenAI-compatible HTTP server started here on 127.0.0.1 (FastAPI +
uvicorn in a thread) that answers deterministically from the reply it is shown, so every score is checkable by hand:
pointwise score = min(10, number of words of the reply); pairwise winner = the reply with more words (tie if equal)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from emorl.rewards import RewardError, build_reward, score
from emorl.rewards.llm_judge import JudgeAnswerError, parse_score, parse_winner

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi import FastAPI, Request  # noqa: E402 - after the skip check
from fastapi.responses import JSONResponse  # noqa: E402


class Behaviour:
    """What the fake server does; tests change it between calls. Counters count requests seen."""

    def __init__(self) -> None:
        self.mode = "honest"  # honest | biased-A | garbage | slow | fail-then-ok | 500-always | 401
        self.fail_first = 0
        self.calls: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0


def _tag(text: str, tag: str) -> str | None:
    m = re.search(f"<{tag}>\n(.*?)\n</{tag}>", text, re.DOTALL)
    return m.group(1) if m else None


def make_app(b: Behaviour) -> Any:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        user = body["messages"][-1]["content"]
        with b.lock:
            b.calls[user] += 1
            b.auth.append(request.headers.get("authorization"))
            n_seen = b.calls[user]
        if b.mode != "hold":
            return await answer(b, body, user, n_seen)
        with b.lock:  # only held requests are counted (a timed-out slow request may still be sleeping here)
            b.in_flight += 1
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
        try:
            return await answer(b, body, user, n_seen)
        finally:
            with b.lock:
                b.in_flight -= 1

    async def answer(b: Behaviour, body: dict[str, Any], user: str, n_seen: int) -> Any:
        if b.mode == "hold":
            await asyncio.sleep(0.05)  # lets concurrent requests overlap (what is asserted is a count, not a time)
        if b.mode == "slow":
            await asyncio.sleep(3.0)
        if b.mode == "fail-then-ok" and n_seen <= b.fail_first:
            return JSONResponse({"error": "busy"}, status_code=503)
        if b.mode == "500-always":
            return JSONResponse({"error": "down"}, status_code=500)
        if b.mode == "401":
            return JSONResponse({"error": "bad key"}, status_code=401)
        if b.mode == "garbage":
            content = "I think this reply deserves a 7."
        elif (reply := _tag(user, "reply")) is not None:
            content = json.dumps({"score": max(1, min(10, len(reply.split())))})
        else:
            a, bb = len(_tag(user, "reply_a").split()), len(_tag(user, "reply_b").split())
            if b.mode == "biased-A":
                content = '{"winner": "A"}'
            else:
                content = json.dumps({"winner": "A" if a > bb else "B" if bb > a else "tie"})
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}

    return app


@pytest.fixture(scope="module")
def server() -> Any:
    b = Behaviour()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(b), log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(200):  # bounded wait for startup
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}/v1", b
    srv.should_exit = True
    th.join(timeout=10)
    sock.close()


@pytest.fixture()
def srv(server: Any) -> Any:
    url, b = server
    b.mode, b.fail_first, b.max_in_flight = "honest", 0, 0
    b.calls.clear()
    b.auth.clear()
    return url, b


def judge(url: str, tmp_path: Any, **kw: Any) -> Any:
    spec = {"type": "llm-judge", "base_url": url, "model": "fake", "cache_dir": str(tmp_path / "cache"),
            "backoff": 0.0, **kw}
    return build_reward(kw.pop("name", "overall"), spec)


PROMPTS = ["I lost my job.", "My dog is sick.", "I failed the exam."]
REPLIES = ["That sounds hard.", "Oh no, I am so sorry to hear that your dog is unwell today.", ""]


def test_pointwise_scores_follow_the_answers_and_empty_scores_0(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    j = judge(url, tmp_path)
    s = score(j, PROMPTS, REPLIES)
    # 3 words -> 3 -> (3-1)/9; 13 words -> 10 -> 1.0; empty -> 0 without asking
    np.testing.assert_allclose(s, [2 / 9, 1.0, 0.0])
    assert sum(b.calls.values()) == 2


def test_answers_are_cached_on_disk_per_prompt_reply_and_rubric(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    s1 = score(judge(url, tmp_path), PROMPTS, REPLIES)
    assert sum(b.calls.values()) == 2
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 2
    s2 = score(judge(url, tmp_path), PROMPTS, REPLIES)  # a fresh judge object: the disk cache answers
    np.testing.assert_array_equal(s1, s2)
    assert sum(b.calls.values()) == 2
    score(judge(url, tmp_path, rubric="empathy"), PROMPTS, REPLIES)  # another rubric: asked again
    assert sum(b.calls.values()) == 4
    score(judge(url, tmp_path), PROMPTS[:1], ["That sounds very hard."])  # another reply: asked
    assert sum(b.calls.values()) == 5


def test_pairwise_asks_both_orders_and_cancels_position_bias(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    j = judge(url, tmp_path, mode="pairwise", reference="uniform")
    refs = ["Hmm.", "Oh no, I am so sorry to hear that your dog is unwell today.", "That is a shame, truly."]
    replies = ["That sounds really hard for you.", REPLIES[1], "Bad."]
    s = j.compare(PROMPTS, replies, refs)
    # longer wins in both orders: 1; identical: 0.5 without asking; shorter loses in both orders: 0
    np.testing.assert_allclose(s, [1.0, 0.5, 0.0])
    assert sum(b.calls.values()) == 4 and set(b.calls.values()) == {1}
    b.mode = "biased-A"  # a judge that always picks the first position: every pair comes out level
    j2 = judge(url, tmp_path / "other", mode="pairwise", reference="uniform")
    np.testing.assert_allclose(j2.compare(PROMPTS, replies, refs), [0.5, 0.5, 0.5])
    with pytest.raises(RewardError, match="needs the reference method's replies"):
        j2(PROMPTS, replies)


def test_unparsable_answer_is_a_clear_error_and_is_not_cached(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    b.mode = "garbage"
    with pytest.raises(RewardError, match="cannot be parsed: not a JSON object"):
        score(judge(url, tmp_path), PROMPTS[:1], REPLIES[:1])
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_5xx_is_retried_then_answered(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    b.mode, b.fail_first = "fail-then-ok", 2
    s = score(judge(url, tmp_path, retries=3), PROMPTS[:1], REPLIES[:1])
    np.testing.assert_allclose(s, [2 / 9])
    assert sum(b.calls.values()) == 3  # two 503s, then the answer


def test_5xx_past_the_retries_names_the_endpoint(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    b.mode = "500-always"
    with pytest.raises(RewardError, match=r"failed 3 time\(s\); last: HTTP 500"):
        score(judge(url, tmp_path, retries=2), PROMPTS[:1], REPLIES[:1])
    assert sum(b.calls.values()) == 3


def test_401_is_not_retried_and_mentions_the_key(srv: Any, tmp_path: Any, monkeypatch: Any) -> None:
    url, b = srv
    b.mode = "401"
    monkeypatch.setenv("EMORL_TEST_JUDGE_KEY", "sk-test")
    with pytest.raises(RewardError, match="HTTP 401.*api_key_env"):
        score(judge(url, tmp_path, api_key_env="EMORL_TEST_JUDGE_KEY"), PROMPTS[:1], REPLIES[:1])
    assert sum(b.calls.values()) == 1
    assert b.auth == ["Bearer sk-test"]


def test_unset_key_variable_is_an_error_before_any_request(srv: Any, tmp_path: Any, monkeypatch: Any) -> None:
    url, b = srv
    monkeypatch.delenv("EMORL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(RewardError, match="overall.api_key_env: the environment variable EMORL_TEST_NO_SUCH_KEY"):
        judge(url, tmp_path, api_key_env="EMORL_TEST_NO_SUCH_KEY")
    assert sum(b.calls.values()) == 0


def test_slow_server_times_out(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    b.mode = "slow"
    with pytest.raises(RewardError, match="no answer within the timeout"):
        score(judge(url, tmp_path, timeout=0.2, retries=1), PROMPTS[:1], REPLIES[:1])


def test_server_down_is_a_clear_error(tmp_path: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(RewardError, match="cannot reach it.*is the server running"):
        score(judge(f"http://127.0.0.1:{port}/v1", tmp_path, retries=1), PROMPTS[:1], REPLIES[:1])


def test_concurrency_bounds_requests_in_flight(srv: Any, tmp_path: Any) -> None:
    url, b = srv
    b.mode = "hold"
    j = judge(url, tmp_path, concurrency=2)
    replies = [" ".join(["word"] * n) for n in range(1, 9)]
    s = score(j, ["hi"] * 8, replies)
    np.testing.assert_allclose(s, [(n - 1) / 9 for n in range(1, 9)])
    assert sum(b.calls.values()) == 8
    assert 1 <= b.max_in_flight <= 2


def test_strict_parsers() -> None:
    assert parse_score('{"score": 7}', 10) == 7
    assert parse_score('```json\n{"score": 3}\n```', 10) == 3
    for bad in ('{"score": 11}', '{"score": 0}', '{"score": 2.5}', '{"score": "7"}', "7", '{"score": 7, "why": 1}',
                'Score: {"score": 7}', '{"score": true}'):
        with pytest.raises(JudgeAnswerError):
            parse_score(bad, 10)
    assert parse_winner('{"winner": "a"}') == "A" and parse_winner('{"winner": "TIE"}') == "tie"
    for bad in ('{"winner": "C"}', '"A"', '{"winner": "A", "score": 1}'):
        with pytest.raises(JudgeAnswerError):
            parse_winner(bad)


def test_options_are_checked(tmp_path: Any) -> None:
    with pytest.raises(RewardError, match="objectives.j.reference: pairwise mode"):
        build_reward("j", {"type": "llm-judge", "base_url": "http://x/v1", "model": "m", "mode": "pairwise"})
    with pytest.raises(RewardError, match="objectives.j.base_url: expected an http"):
        build_reward("j", {"type": "llm-judge", "base_url": "localhost:8000", "model": "m"})
    with pytest.raises(RewardError, match="objectives.j.modle: unknown option"):
        build_reward("j", {"type": "llm-judge", "base_url": "http://x/v1", "modle": "m", "model": "m"})

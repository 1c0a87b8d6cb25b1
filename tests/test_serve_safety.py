"""``emorl serve`` under concurrent mixed traffic and against drive-by requests: every tokenizer is used by one
thread only (recorded, under 40 concurrent plain, streamed, scoring, routed and cancelled requests), all are
answered and the server stays healthy; JSON routes need application/json (415); no CORS headers; the API key is
compared in constant time; loopback is the default; a public --host without a key warns."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import KEY, STATEMENT, Server, body, chat, make_run  # noqa: E402

from emorl.config import load_config  # noqa: E402
from emorl.serve import Engine, create_app  # noqa: E402

RECORDED = ("__call__", "encode", "decode", "batch_decode", "apply_chat_template", "convert_ids_to_tokens",
            "get_vocab", "pad", "_encode_plus", "_batch_encode_plus")


def record_threads(tok: Any, seen: dict[int, set[str]]) -> None:
    """Make ``tok`` record the name of every thread that calls one of its entry points (by object id)."""
    cls = tok.__class__

    def wrap(name: str) -> Any:
        orig = getattr(cls, name)

        def method(self: Any, *a: Any, **k: Any) -> Any:
            seen.setdefault(id(self), set()).add(threading.current_thread().name)
            return orig(self, *a, **k)

        return method

    tok.__class__ = type(f"Recorded{cls.__name__}", (cls,), {n: wrap(n) for n in RECORDED if hasattr(cls, n)})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    run = make_run(tmp_path_factory.mktemp("serve-safety"))
    engine = Engine(run, max_batch_rows=64, max_tokens=400)
    server = Server(create_app(engine))
    keyed = Server(create_app(engine, api_key=KEY, manage_engine=False))
    yield {"run": run, "engine": engine, "url": server.url, "key_url": keyed.url}
    keyed.stop()
    server.stop()
    engine.close()


def test_no_tokenizer_is_used_by_two_threads_under_mixed_concurrent_load(served: dict[str, Any]) -> None:
    from emorl.router.run import fit_run

    run, engine, url = served["run"], served["engine"], served["url"]
    fit_run(run, load_config(str(run / "config.yaml"), ["route.prompts=6", "route.step=0.5"]),
            base=engine.ens.base, ens=engine.ens)  # before the load: the router is fitted on this thread
    if hasattr(engine, "worker"):
        engine.worker.forget_router()
    else:  # the engine before issue 23 (this test must fail there: one tokenizer on two threads)
        engine._router = None
    seen: dict[int, set[str]] = {}
    tokenizers = {"decode": engine.ens.tokenizer,
                  "requests": getattr(engine, "request_tokenizer", engine.ens.tokenizer)}
    for tok in {id(t): t for t in tokenizers.values()}.values():
        record_threads(tok, seen)
    statuses: list[Any] = []
    lock = threading.Lock()

    def note(kind: str, value: Any) -> None:
        with lock:
            statuses.append((kind, value))

    def plain(i: int) -> None:
        r = chat(url, body(max_tokens=4 + i % 5, temperature=0.5 * (i % 3), seed=i,
                           emorl={"weights": [1 + i % 2, i % 3, 0.5]}))
        note("plain", r.status_code)

    def streamed(i: int) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json=body(max_tokens=6, stream=True, seed=i, temperature=1.0)) as r:
            lines = [x for x in r.iter_lines() if x]
        note("stream", lines[-1])

    def cancelled(i: int) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json=body(max_tokens=300, stream=True, seed=i, temperature=1.0)) as r:
            for j, _ in enumerate(r.iter_lines()):
                if j > 2:
                    break
        note("cancelled", "hung up")

    def scored(i: int) -> None:
        r = httpx.post(f"{url}/v1/score", json={"pairs": [{"statement": STATEMENT, "reply": f"reply {i}"}]},
                       timeout=120)
        note("score", r.status_code)

    def routed(i: int) -> None:
        r = chat(url, body(max_tokens=4, temperature=0, emorl={"weights": "auto"},
                           messages=[{"role": "user", "content": f"{STATEMENT} ({i})"}]))
        note("auto", r.status_code)

    kinds = [plain, streamed, cancelled, scored, routed]
    threads = [threading.Thread(target=kinds[i % len(kinds)], args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert len(statuses) == 40
    assert all(v in (200, "data: [DONE]", "hung up") for _, v in statuses), statuses
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok"
    assert httpx.post(f"{url}/v1/chat/completions", json=body(max_tokens=2)).status_code == 200
    shared = {name: seen.get(id(t), set()) for name, t in tokenizers.items()}
    assert all(len(threads_) == 1 for threads_ in shared.values()), shared
    assert shared["decode"] != shared["requests"]  # each has its owner: the decode thread, the event loop


def test_json_routes_refuse_other_content_types(served: dict[str, Any]) -> None:
    import json

    url = served["url"]
    payload = json.dumps(body(max_tokens=2))
    for route in ("/v1/chat/completions", "/v1/score"):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = httpx.post(f"{url}{route}", content=payload, headers=headers)
            assert r.status_code == 415, (route, ctype, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(f"{url}/v1/chat/completions", content=payload,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_no_cors_headers_for_other_origins(served: dict[str, Any]) -> None:
    url = served["url"]
    origin = {"Origin": "https://evil.example"}
    r = httpx.post(f"{url}/v1/chat/completions", json=body(max_tokens=2), headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(f"{url}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code in (404, 405)


def test_the_api_key_is_compared_in_constant_time(served: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from emorl.serve import app as app_module

    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", compare)
    url = served["key_url"]
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert calls == [(b"Bearer wrong", f"Bearer {KEY}".encode()), (f"Bearer {KEY}".encode(),) * 2]


def test_loopback_is_the_default_host() -> None:
    from emorl.serve.cli import add_parser, is_loopback

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--run", "x"])
    assert args.host == "127.0.0.1" and is_loopback(args.host)
    assert not is_loopback("0.0.0.0") and is_loopback("::1") and is_loopback("localhost")


def test_a_public_host_without_a_key_warns(tmp_path: Any, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from emorl.serve import cli
    from emorl.utils import EmorlError

    monkeypatch.delenv("EMORL_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)):
        caplog.clear()
        argv = ["serve", "--run", str(tmp_path / "no-run"), "--host", host] + (["--api-key", key] if key else [])
        with caplog.at_level(logging.WARNING, logger="emorl.serve"), pytest.raises(EmorlError, match="config.yaml"):
            cli.run(parser.parse_args(argv))  # the warning comes before the run is loaded
        assert ("without an API key" in caplog.text) == warned, (host, key)

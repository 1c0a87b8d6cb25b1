"""``emorl serve --replicas 2`` on a tiny trained run (``emorl train --preset tiny``), through Ray Serve's HTTP proxy
on loopback: requests are answered by both replicas, a seeded reply is the same whichever replica answers and equals
``emorl generate``'s, streaming and the page work, and Ctrl-C shuts Serve and the Ray instance down with no process
left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from emorl.serve.replicas import REPLICA_HEADER, replica_app
from emorl.utils import EmorlError


def test_missing_ray_serve_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # from ray import serve -> ImportError
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(EmorlError, match=r"--replicas needs Ray Serve .*pip install 'emorl\[ray\]'"):
        replica_app(tmp_path, 2)


try:
    import httpx
    from ray import serve  # noqa: F401
except ImportError as e:  # the tests below need Ray Serve; the one above runs without it
    MISSING: str | None = f"{e.name} is not installed: pip install 'emorl[ray]' httpx"
else:
    MISSING = None
needs_serve = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

STATEMENT = "I lost my job today and I feel awful."
WEIGHTS = {"reflection": 1.0, "empathy": 0.5, "fluency": 0.2}
SAMPLING = {"max_tokens": 5, "temperature": 0.9, "seed": 1}


def env(ray_tmp: str) -> dict[str, str]:
    """Offline, Ray's files under a short private folder (socket paths are limited), no auth token, no usage stats."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(folder: str) -> list[str]:
    """Command lines of live processes that name ``folder`` (Ray's own processes name their session folder)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State"))
        except (OSError, StopIteration):
            continue
        if folder in cmd and "zombie" not in state:
            out.append(f"{pid}: {cmd[:200]}")
    return out


class Cli:
    """``emorl serve --replicas 2`` in a subprocess whose output is collected by a thread."""

    def __init__(self, run: Path, port: int, environ: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emorl.cli", "serve", "--run", str(run), "--replicas", "2", "--port", str(port),
             "--max-wait-ms", "5", "--grace-s", "1"],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "replicas at http://127.0.0.1:" in line:
                self.ready.set()

    def output(self) -> str:
        return "".join(self.lines[-60:])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("replicas")
    ray_tmp = tempfile.mkdtemp(prefix="rayr", dir="/tmp")
    environ = env(ray_tmp)
    run = root / "run"
    subprocess.run([sys.executable, "-m", "emorl.cli", "train", "--preset", "tiny", "--output", str(run),
                    "--no-progress"], env=environ, check=True, capture_output=True, timeout=600)
    port = free_port()
    cli = Cli(run, port, environ)
    try:
        assert cli.ready.wait(300), f"emorl serve --replicas did not start:\n{cli.output()}"
        yield {"run": run, "url": f"http://127.0.0.1:{port}", "cli": cli, "ray_tmp": ray_tmp, "env": environ}
    finally:
        if cli.proc.poll() is None:
            cli.proc.send_signal(signal.SIGINT)
            try:
                cli.proc.wait(120)
            except subprocess.TimeoutExpired:
                cli.proc.kill()
                cli.proc.wait(30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def chat(url: str, **kw: Any) -> Any:
    body = {"model": "emorl", "messages": [{"role": "user", "content": STATEMENT}],
            "emorl": {"weights": WEIGHTS, "anchor": "base"}, **SAMPLING, **kw}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


@needs_serve
def test_both_replicas_answer_the_same_seeded_reply_as_emorl_generate(served: dict[str, Any]) -> None:
    url = served["url"]
    seen: dict[str, set[str]] = {}
    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):  # the proxy picks the less busy of two replicas: concurrent requests reach both
            for r in pool.map(lambda _: chat(url), range(4)):
                assert r.status_code == 200, r.text
                seen.setdefault(r.headers[REPLICA_HEADER], set()).add(r.json()["choices"][0]["message"]["content"])
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen
    replies = set().union(*seen.values())
    assert len(replies) == 1, seen  # the same reply whichever replica decoded it, in whatever batch
    out = subprocess.run(
        [sys.executable, "-m", "emorl.cli", "generate", "--run", str(served["run"]), "--prompt", STATEMENT,
         "--weights", ",".join(str(WEIGHTS[o]) for o in WEIGHTS), "--anchor", "base",
         "--max-new-tokens", str(SAMPLING["max_tokens"]), "--temperature", str(SAMPLING["temperature"]),
         "--top-k", "50", "--seed", str(SAMPLING["seed"])],
        env=served["env"], check=True, capture_output=True, text=True, timeout=300)
    generated = json.loads(out.stdout.strip().splitlines()[-1])
    assert generated["weights"] == WEIGHTS
    assert replies == {generated["reply"]}


@needs_serve
def test_stream_page_and_routes_through_the_proxy(served: dict[str, Any]) -> None:
    url = served["url"]
    plain = chat(url).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"model": "emorl", "messages": [{"role": "user", "content": STATEMENT}], "stream": True,
                            "emorl": {"weights": WEIGHTS, "anchor": "base"}, **SAMPLING}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers[REPLICA_HEADER]
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert "emorl" in [m["id"] for m in models["data"]]
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "/static/app.js" in page.text
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "emorl", "messages": []}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


@needs_serve
def test_ctrl_c_stops_serve_and_ray_leaving_no_process(served: dict[str, Any]) -> None:
    cli: Cli = served["cli"]
    assert processes_under(served["ray_tmp"])  # Ray's processes are found by their session folder while it runs
    cli.proc.send_signal(signal.SIGINT)
    assert cli.proc.wait(120) == 0, cli.output()
    left = processes_under(served["ray_tmp"])
    for _ in range(20):  # a worker may take a moment after ray.shutdown() returns to exit
        if not left:
            break
        time.sleep(0.5)
        left = processes_under(served["ray_tmp"])
    assert not left, left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served['url']}/health", timeout=5)

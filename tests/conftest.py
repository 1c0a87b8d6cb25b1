"""Shared fixtures. Tests run offline (hub access fails fast) on tiny random models built from configs; a
few tests marked ``slow`` use the real default model."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `device: auto` is pinned to the CPU: many tests compare replies token for token (fast path = reference, one-hot
# mix = one adapter, batched = alone), which holds exactly on CPU. CUDA kernels pick other reduction orders for
# other batch shapes, so on a GPU those tests would need a tolerance (token agreement; README, "On a GPU"); set
# EMORL_TEST_DEVICE=cuda to run the suite there anyway.
if os.environ.get("EMORL_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

# With CI=true a skip fails the session unless its reason holds one of these: .ci/run installs every extra and
# Chromium, so anything else that skips there (a missing package, a missing browser) is a broken CI, not a pass.
CI_ALLOWED_SKIPS: tuple[str, ...] = ("needs a CUDA GPU",)
_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _check_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _check_skip(report)  # a module-level importorskip skips the whole file at collection


def _check_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if os.environ.get("CI", "").lower() == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(ok in reason for ok in CI_ALLOWED_SKIPS):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips:
        print(f"\nCI=true: {len(_unexpected_skips)} test(s) skipped that must run here (allowed reasons: "
              f"{', '.join(CI_ALLOWED_SKIPS)}):\n  " + "\n  ".join(_unexpected_skips))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

# One intra-op thread: tiny models are dominated by per-op overhead, and with 2 OpenMP threads on a loaded 2-core
# box every small matmul spin-waits (measured 30x slower). Set EMORL_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get("EMORL_TEST_THREADS", "1")))


@pytest.fixture
def tiny_base():
    """A fresh tiny random Llama with the real SmolLM2 tokenizer (function scope: tests attach adapters)."""
    from emorl.config import ModelConfig
    from emorl.models import load_base

    return load_base(ModelConfig(name="tiny-llama", system_prompt=None))


@pytest.fixture
def tiny_t5_base():
    from emorl.config import ModelConfig
    from emorl.models import load_base

    return load_base(ModelConfig(name="tiny-t5", system_prompt=None))


@pytest.fixture(scope="session")
def smollm2_base():
    """The real default model (loaded once per session; do not attach adapters to it in place)."""
    from emorl.models import load_base

    return load_base()


BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def script(monkeypatch, capsys):
    """Run bench/NAME.py in this process as `python bench/NAME.py ARGS` (imports shared: seconds, not a new
    interpreter each) and return its printed output."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(BENCH / f"{name}.py"), *args])
        monkeypatch.setattr(sys, "path", list(sys.path))  # undone after the test: scripts put bench/ on it
        try:
            runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out

    return run


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A finished study on the tiny model with the smallest budget (adapters on disk, unlike the stored ones): the
    study a bench script's ``--quick`` makes when given no ``--run`` (bench/_common.py), built once in this process
    and only read (a matched run goes beside it)."""
    from emorl.config import load_config
    from emorl.pipeline import run_pipeline

    run = tmp_path_factory.mktemp("bench") / "run"
    overrides = runpy.run_path(str(BENCH / "_common.py"))["TINY_OVERRIDES"]
    run_pipeline(load_config("tiny", overrides), run, progress=False)
    return run

"""The Ray executor on a local Ray instance (2 CPUs): the tiny preset gives the same adapters and scores as the
local executor; a training worker killed mid-task is retried from its checkpoint with the same result; a driver
killed mid-run is completed by ``--resume`` without redoing finished stages; no Ray gives the install command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from emorl.config import load_config
from emorl.pipeline import run_pipeline
from emorl.utils import EmorlError

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "fixtures" / "toy_rewards.py"
# rewards that vary on a random model's gibberish (the real proxies score it all 0): adapters really differ
OVERRIDES = [f"objectives.{o}.{k}" for o, fn in (("reflection", "vowels"), ("empathy", "early_letters"),
                                                  ("fluency", "spaces"))
             for k in ("type=python", f"function={TOY}:{fn}")]
OVERRIDES += ["search.generation.do_sample=true", "eval.generation.do_sample=true"]  # greedy: special tokens only


KL = ("eval.kl=true", "eval.kl_prompts=4")  # the KL comes from each executor's own decode (kl_rows)


def tiny(*extra: str):
    return load_config("tiny", [*OVERRIDES, *extra])


def test_missing_ray_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(EmorlError, match=r"pip install 'emorl\[ray\]'"):
        run_pipeline(tiny("executor.kind=ray"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "adapters").exists()


ray = pytest.importorskip("ray")


def ray_env(tmp: str) -> dict[str, str]:
    """Ray's files under a short private folder (socket paths are limited to ~100 characters), no auth token."""
    return {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_instance():
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    old = {k: os.environ.get(k) for k in ray_env(tmp)}
    os.environ.update(ray_env(tmp))
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
           if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=tmp,
             runtime_env={"env_vars": env})
    yield
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(tmp, ignore_errors=True)


def tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def same_tensors(a: Path, b: Path) -> None:
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def method_scores(run: Path) -> dict[str, dict]:
    res = json.loads((run / "eval" / "results.json").read_text())
    return {m: {k: v for k, v in r["summary"].items() if not k.startswith(("decode_s", "tokens_per_s"))}
            for m, r in res["methods"].items()}


@pytest.fixture(scope="module")
def local_and_ray(ray_instance, tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    run_pipeline(tiny(*KL), root / "local", progress=False)
    run_pipeline(tiny("executor.kind=ray", *KL), root / "ray", progress=False)
    return root / "local", root / "ray"


# Ray trains each adapter in its own task (its own batch of rollouts, executor.num_cpus threads); local trains the K
# adapters in one batched rollout with every core. Where the CPU's float32 kernels give the same bits for every batch
# size and thread count (this 2-core AVX2 machine: threads 1 vs 2 and together vs alone measured bit-identical) the
# adapters are identical; on AMX Xeons they are not (the tiny preset's empathy adapter differed by 1.2e-3, 1% of its
# largest weight, the others by 1e-6). The stated tolerance: every weight within 2% of its tensor's largest weight.
TOLERANCE = 0.02


def close_tensors(a: Path, b: Path) -> bool:
    """Every tensor of ``b`` within TOLERANCE · max|w| of ``a``'s; returns whether all are bit-identical."""
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        bound = TOLERANCE * float(ta[k].abs().max())
        assert float((ta[k] - tb[k]).abs().max()) <= bound, k
    return all(torch.equal(ta[k], tb[k]) for k in ta)


def test_close_tensors_states_the_tolerance(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, delta in (("a", 0.0), ("b", 0.01), ("c", 0.03)):
        (tmp_path / name / "adapter").mkdir(parents=True)
        save_file({"w": torch.tensor([1.0, -0.5]) + torch.tensor([delta, 0.0])},
                  tmp_path / name / "adapter" / "x.safetensors")
    assert close_tensors(tmp_path / "a", tmp_path / "a")
    assert not close_tensors(tmp_path / "a", tmp_path / "b")  # within 2% of max |w| = 1: close, not identical
    with pytest.raises(AssertionError):
        close_tensors(tmp_path / "a", tmp_path / "c")


def test_ray_gives_the_same_adapters_and_scores_as_local(local_and_ray):
    local, ray_run = local_and_ray
    assert (ray_run / "report.md").exists()
    identical = True
    for sub in ("adapters", "baselines"):
        names = sorted(p.name for p in (local / sub).iterdir())
        assert names == sorted(p.name for p in (ray_run / sub).iterdir())
        for n in names:
            identical &= close_tensors(local / sub / n, ray_run / sub / n)
    if not identical:  # a CPU whose kernels depend on batch size or threads: no promise past the adapters
        pytest.skip("adapters within the stated tolerance but not bit-identical on this CPU; searches and scores "
                    "follow the adapters")
    for mode in ("hidden", "hidden-convex", "params", "params-convex"):
        a = json.loads((local / "search" / mode / "best.json").read_text())
        b = json.loads((ray_run / "search" / mode / "best.json").read_text())
        assert a["weights"] == b["weights"] and a["aggregate"] == b["aggregate"], mode
    scores = method_scores(local)
    assert scores == method_scores(ray_run)
    assert all("kl_per_token" in m for m in scores.values())  # measured on the Ray workers' decode too
    assert len({round(m["mean_reward"]["mean"], 6) for m in scores.values()}) > 2, "the methods should differ"
    assert not (ray_run / "checkpoints").exists() or not any((ray_run / "checkpoints").iterdir())


def test_a_killed_training_worker_is_retried_from_its_checkpoint(local_and_ray, tmp_path):
    from emorl.executors import TrainJob
    from emorl.executors.local import Resources
    from emorl.executors.ray_backend import RayExecutor
    from emorl.pipeline import normalised

    local, _ = local_and_ray
    run = tmp_path / "run"
    cfg = normalised(tiny(), run)
    ex = RayExecutor(cfg, run, Resources(cfg))
    killed: list[tuple[int, int]] = []

    def kill_once(key: str, step: int, pid: int | None) -> None:
        if not killed and pid is not None and step >= cfg.train.checkpoint_every:
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, step))

    ex.on_checkpoint = kill_once
    try:
        ex.train([TrainJob("single", ("empathy",))], resume=False, progress=False)
    finally:
        ex.close()
    assert killed, "the worker was never killed (no checkpoint seen)"
    same_tensors(local_and_ray[1] / "adapters" / "empathy", run / "adapters" / "empathy")  # = uninterrupted Ray
    info = json.loads((run / "adapters" / "empathy" / "emorl.json").read_text())
    assert info["extra"]["finished"] and info["steps"] == cfg.train.max_steps


def test_a_killed_driver_is_completed_by_resume(local_and_ray, tmp_path, caplog):
    """SIGKILL the whole `emorl run --executor ray` process group while a job trains (some adapter finished, a
    checkpoint mirrored), then --resume: finished adapters are kept byte for byte, the interrupted job continues
    from the mirrored checkpoint, and the end result equals the uninterrupted local run."""
    local, _ = local_and_ray
    run = tmp_path / "run"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, **ray_env(tmp), "EMORL_TOY_REWARD_SLEEP": "0.5"}  # slower steps: a window to kill in
    cmd = [sys.executable, "-m", "emorl.cli", "run", "--preset", "tiny", "--output", str(run), "--executor", "ray",
           "--no-progress", "--threads", "1", *OVERRIDES, *KL]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def finished() -> list[Path]:
        return [f.parent for sub in ("adapters", "baselines") for f in (run / sub).glob("*/emorl.json")]

    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if finished() and list((run / "checkpoints").glob("*/state.json")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", tmp], check=False)  # the killed driver's Ray processes
        shutil.rmtree(tmp, ignore_errors=True)
    assert not (run / "report.md").exists()
    done = {p: p.read_bytes() for f in finished() for p in sorted(f.rglob("*")) if p.is_file()}
    assert done
    with caplog.at_level(logging.INFO, logger="emorl.ray"):
        run_pipeline(tiny("executor.kind=ray", *KL), run, resume=True, progress=False)
    assert "resuming from" in caplog.text, "the interrupted job did not continue from its mirrored checkpoint"
    # byte-identical: not trained again (emorl.json records each training's wall time)
    assert {p: p.read_bytes() for p in done} == done
    assert (run / "report.md").exists()
    identical = True
    for sub in ("adapters", "baselines"):
        for n in (local / sub).iterdir():
            identical &= close_tensors(n, run / sub / n.name)
    if identical:  # see TOLERANCE: scores follow the adapters
        assert method_scores(local) == method_scores(run)

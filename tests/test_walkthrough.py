"""The README's newcomer path cannot rot: its own-model walkthrough is examples/own-model.yaml (the README shows the
file verbatim) and runs here end to end on the tiny model; its test command is the one CI runs; it stays short."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
WALKTHROUGH = "examples/own-model.yaml"
QUICK_START = ["./install.sh && .venv/bin/emorl run --preset default --output runs/default",
               "./install.sh dev && .venv/bin/python -m pytest -ra -n auto"]


def test_readme_is_short_and_shows_the_quick_start_ci_runs():
    assert len(README.splitlines()) <= 200
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    assert block.splitlines() == QUICK_START
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    # the README's test command is CI's: -ra (skip reasons), -n auto (pytest-xdist: one worker per core)
    assert ci[-1] == QUICK_START[1]


def test_readme_shows_the_walkthrough_file_verbatim():
    shown = re.search(r"```yaml\n(# Your own model.*?)```", README, re.S).group(1)
    assert shown == (ROOT / WALKTHROUGH).read_text()
    assert f"emorl run --config {WALKTHROUGH} --output runs/own" in README


def test_walkthrough_runs_on_the_tiny_model(tmp_path, monkeypatch):
    """The README's own-model command on the walkthrough file, with the tiny random model in place of the hub model
    and a shorter budget: the python rewards, the JSONL data, every stage and the report."""
    from emorl.cli import main

    monkeypatch.chdir(ROOT)  # the YAML's paths are relative to the repository, as in the README
    run = tmp_path / "own"
    rc = main(["run", "--config", WALKTHROUGH, "--output", str(run), "--no-progress", "model.name=tiny-llama",
               "train.max_steps=2", "train.val_every=2", "search.iterations=1", "eval.prompts=3"])
    assert rc in (0, None)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["objectives"]) == ["warmth", "brevity", "fluency"]
    assert set(results["methods"]) == {"base", "emorl", "uniform", "soups", "single:warmth", "single:brevity",
                                       "single:fluency"}
    assert results["methods"]["emorl"]["summary"]["mean_reward"]["n"] == 1
    assert (run / "report.md").exists() and {p.name for p in (run / "adapters").iterdir()} == {"warmth", "brevity",
                                                                                                "fluency"}

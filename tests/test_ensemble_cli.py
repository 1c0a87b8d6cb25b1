"""Loading ensembles from disk (run folders, adapter folders, refusals) and the ``emorl generate`` CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from emorl.cli import main
from emorl.config import ModelConfig, load_config
from emorl.ensemble import EnsembleModel
from emorl.models import AdapterInfo, add_adapters, load_base, save_adapter
from emorl.utils import EmorlError

OBJECTIVES = {"short": {"type": "length", "target": 3.0}, "long": {"type": "length", "target": 30.0}}
PROMPTS = ["I lost my job today.", "My cat is sick."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `emorl train` leaves it: config.yaml + adapters/<objective>/ with emorl.json."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny")
    cfg.objectives = dict(OBJECTIVES)
    cfg.save(run / "config.yaml")
    base = load_base(cfg.model)
    model = add_adapters(base, list(OBJECTIVES), cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    for name, spec in OBJECTIVES.items():
        save_adapter(model, name, run / "adapters" / name,
                     AdapterInfo(objective=name, rewards={name: spec}, base=base.identity, steps=1))
    return run


def test_from_run_loads_adapters_in_config_order(run_dir: Path) -> None:
    ens = EnsembleModel.from_run(run_dir)
    assert ens.names == ["short", "long"]
    res = ens.generate(PROMPTS, [0.7, 0.3], max_new_tokens=4)
    same = EnsembleModel(load_base(ens.base.config), {n: run_dir / "adapters" / n for n in ens.names})
    assert torch.equal(res.token_ids, same.generate(PROMPTS, [0.7, 0.3], max_new_tokens=4).token_ids)
    assert EnsembleModel.from_run(run_dir, names=["long"]).names == ["long"]
    with pytest.raises(EmorlError, match=r"no trained adapter for \['empathy'\]"):
        EnsembleModel.from_run(run_dir, names=["long", "empathy"])


def test_refuses_adapters_from_another_base(run_dir: Path, tmp_path: Path) -> None:
    other = load_base(ModelConfig(name="tiny-llama", system_prompt=None, seed=1))  # same shapes, other weights
    with pytest.raises(EmorlError, match="was trained on base"):
        EnsembleModel(other, {"short": run_dir / "adapters" / "short"})
    plain = tmp_path / "plain"
    shutil.copytree(run_dir / "adapters" / "short", plain)
    (plain / "emorl.json").unlink()
    base = load_base(ModelConfig(name="tiny-llama", system_prompt=None))
    with pytest.raises(EmorlError, match="has no emorl.json"):
        EnsembleModel(base, {"plain": plain})
    assert EnsembleModel(base, {"plain": plain}, require_metadata=False).names == ["plain"]
    dup = tmp_path / "dup"
    shutil.copytree(run_dir / "adapters" / "short", dup)
    with pytest.raises(EmorlError, match="both trained for objective 'short'"):
        EnsembleModel(load_base(ModelConfig(name="tiny-llama", system_prompt=None)),
                      {"a1": run_dir / "adapters" / "short", "a2": dup})


def test_cli_run_weights_points_and_scores(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--run", str(run_dir), "--weights", "1,0.5", "--weights", "0,1", "--prompt", PROMPTS[0],
               "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--score", "--output", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and [r["prompt"] for r in rows] == PROMPTS * 2
    assert rows[0]["weights"] == {"short": 1.0, "long": 0.5} and rows[0]["mode"] == "hidden"
    assert set(rows[0]["scores"]) == {"short", "long"} and all(0 <= v <= 1 for v in rows[0]["scores"].values())
    ref = EnsembleModel.from_run(run_dir).generate(PROMPTS, [[1, 0.5], [0, 1]], max_new_tokens=4)
    assert [r["reply"] for r in rows] == ref.texts[0] + ref.texts[1]


def test_cli_adapters_input_file_and_sampling(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    args = ["generate", "--adapters", str(run_dir / "adapters" / "short"), str(run_dir / "adapters" / "long"),
            "--weights", "0.5,0.5", "--mode", "logits", "--input", str(inp), "--prompt-field", "text",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible
    assert [json.loads(line)["prompt"] for line in first.splitlines()] == PROMPTS


def test_cli_errors_are_clear(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["generate", "--run", str(run_dir), "--prompt", "hi"]
    assert main([*base, "--weights", "1,0,2"]) == 2
    assert "each point needs 2 weights" in capsys.readouterr().err
    assert main([*base, "--weights", "0,0", "--anchor", "none"]) == 2
    assert "all zero" in capsys.readouterr().err
    assert main([*base, "--weights", "1,x"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main([*base, "--weights", "1,1", "--greedy", "--temperature", "0.5"]) == 2
    assert "--greedy cannot" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", "--run", str(run_dir), "--input", str(bad), "--weights", "1,1"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err

"""Every file emorl reads back, cut short: a clear EmorlError naming the file and the fix, or (the model cache)
a rebuild. A truncated file is what a full disk or an interrupted copy leaves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from emorl.config import LoraConfig, ModelConfig, load_config
from emorl.models import AdapterInfo, add_adapters, load_adapters, load_base, read_adapter_info, save_adapter
from emorl.utils import EmorlError, check_safetensors, load_safetensors_checked, read_json_checked


def _truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])


def _tensors(path: Path) -> Path:
    save_file({"a": torch.arange(40, dtype=torch.float32).view(8, 5), "b": torch.ones(3)}, str(path))
    return path


@pytest.mark.parametrize("keep", [0, 5, 20, 0.5, 0.99])
def test_truncated_safetensors_is_named_with_its_fix(tmp_path, keep):
    p = _tensors(tmp_path / "w.safetensors")
    check_safetensors(p, "test file", "restore it")  # whole: passes
    assert load_safetensors_checked(p, "test file", "restore it")["a"][1, 0] == 5
    _truncate(p, keep)
    for fn in (check_safetensors, load_safetensors_checked):
        with pytest.raises(EmorlError) as e:
            fn(p, "test file", "restore it")
        assert str(e.value).startswith(f"test file {p} is corrupt (") and str(e.value).endswith("; restore it")


def test_padded_or_missing_safetensors_and_cut_json(tmp_path):
    p = _tensors(tmp_path / "w.safetensors")
    p.write_bytes(p.read_bytes() + b"\0" * 4)
    with pytest.raises(EmorlError, match="cut short or padded"):
        check_safetensors(p, "f", "fix")
    with pytest.raises(EmorlError, match=r"f .*nope.safetensors is missing; fix"):
        check_safetensors(tmp_path / "nope.safetensors", "f", "fix")
    j = tmp_path / "x.json"
    j.write_text(json.dumps({"a": [1, 2, 3]}))
    assert read_json_checked(j, "f", "fix") == {"a": [1, 2, 3]}
    _truncate(j, 0.5)
    with pytest.raises(EmorlError, match=r"f .*x.json is corrupt \(.*\); fix"):
        read_json_checked(j, "f", "fix")


def _adapter(tmp_path: Path, base) -> Path:
    add_adapters(base, ["short"], LoraConfig(r=2, alpha=4, dropout=0.0))
    info = AdapterInfo(objective="short", base=base.identity)
    return save_adapter(base.model, "short", tmp_path / "run" / "adapters" / "short", info)


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "adapter_config.json", "emorl.json"])
def test_cut_adapter_file_is_a_clear_error(tmp_path, tiny_base, fname):
    folder = _adapter(tmp_path, tiny_base)
    read_adapter_info(folder)
    _truncate(folder / fname, 0.6)
    calls = [lambda: load_adapters(load_base(tiny_base.config), [folder])]
    if fname == "emorl.json":  # the metadata alone (reports, plans) reads only this file
        calls.append(lambda: read_adapter_info(folder))
    for fn in calls:
        with pytest.raises(EmorlError) as e:
            fn()
        msg = str(e.value)
        assert f"adapter file {folder / fname} is corrupt" in msg and "re-train it" in msg, msg


def test_emorl_generate_on_a_cut_adapter_prints_the_error(tmp_path, tiny_base, capsys):
    """The reported case: `emorl generate --run RUN` printed a raw SafetensorError traceback."""
    from emorl.cli import main

    folder = _adapter(tmp_path, tiny_base)
    cfg = load_config("tiny", ["objectives={short: {type: length}}"])
    cfg.save(tmp_path / "run" / "config.yaml")
    _truncate(folder / "adapter_model.safetensors", 0.5)
    rc = main(["generate", "--run", str(tmp_path / "run"), "--weights", "1", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"emorl: error: adapter file {folder / 'adapter_model.safetensors'} is "
                                      "corrupt"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("fname", ["state.json", "weights.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_cut_checkpoint_file_is_a_clear_error(tmp_path, fname):
    from emorl.train.checkpoint import load_checkpoint, save_checkpoint

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()
    folder = tmp_path / "checkpoints" / "single"
    save_checkpoint(folder, params={"p": {"w": w}}, optimizers={"p": opt}, state={"step": 1})
    assert load_checkpoint(folder, params={"p": {"w": w}}, optimizers={"p": opt}) == {"step": 1}
    _truncate(folder / fname, 0.5)
    with pytest.raises(EmorlError) as e:
        load_checkpoint(folder, params={"p": {"w": w}}, optimizers={"p": opt})
    msg = str(e.value)
    assert msg.startswith(f"checkpoint file {folder / fname} is corrupt") and f"delete {folder}" in msg, msg


def test_corrupt_model_cache_entry_is_rebuilt(tmp_path, caplog):
    from emorl.models.gguf import _atomic_dir

    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        _tensors(tmp / "model.safetensors")
        (tmp / "config.json").write_text('{"model_type": "llama"}')

    target = tmp_path / "cache" / "smollm2-135m-instruct"
    _atomic_dir(target, build)
    _atomic_dir(target, build)
    assert len(builds) == 1  # a whole entry is reused
    _truncate(target / "model.safetensors", 0.5)
    with caplog.at_level(logging.WARNING, logger="emorl.models"):
        assert _atomic_dir(target, build) == target
    assert len(builds) == 2
    check_safetensors(target / "model.safetensors", "f", "fix")  # whole again
    assert any(f"model cache entry {target / 'model.safetensors'} is corrupt" in r.getMessage()
               and "rebuilding" in r.getMessage() for r in caplog.records)
    (target / "config.json").write_text('{"model_type": ')
    _atomic_dir(target, build)
    assert len(builds) == 3 and json.loads((target / "config.json").read_text())


def test_cut_local_model_folder_is_a_clear_error(tmp_path, tiny_base):
    folder = tmp_path / "mymodel"
    tiny_base.model.save_pretrained(str(folder))
    tiny_base.tokenizer.save_pretrained(str(folder))
    _truncate(folder / "model.safetensors", 0.7)
    with pytest.raises(EmorlError) as e:
        load_base(ModelConfig(name=str(folder)))
    assert f"{folder / 'model.safetensors'} is corrupt" in str(e.value) and "restore the folder" in str(e.value)

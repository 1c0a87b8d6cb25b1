import pytest

from emorl.config import RunConfig, describe, load_config, parse_override, preset_names
from emorl.utils import EmorlError


def test_presets_load():
    assert {"default", "tiny", "paper-t5-pair"} <= set(preset_names())
    for p in preset_names():
        cfg = load_config(p)
        assert isinstance(cfg, RunConfig)


def test_dotted_overrides_typed():
    cfg = load_config("tiny", ["train.lr=3e-4", "train.k=4", "train.objectives=[empathy]", "model.system_prompt=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.k == 4
    assert cfg.trained_objectives() == ["empathy"]
    assert cfg.model.system_prompt is None


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=1e-3") == (["a"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(EmorlError, match="key=value"):
        parse_override("nonsense")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(EmorlError, match=r"unknown config key 'train.lrr'.*Valid keys of train: strategy"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(EmorlError, match="unknown config key 'bogus'"):
        load_config(None, ["bogus=1"])


def test_wrong_type_and_choice():
    with pytest.raises(EmorlError, match="train.k: expected an integer"):
        load_config("tiny", ["train.k=2.5"])
    with pytest.raises(EmorlError, match="train.strategy: 'best' is not one of"):
        load_config("tiny", ["train.strategy=best"])
    with pytest.raises(EmorlError, match="expected true or false"):
        load_config("tiny", ["data.shuffle=maybe"])


def test_cross_field_validation():
    with pytest.raises(EmorlError, match="fixed_weights"):
        load_config("tiny", ["train.strategy=fixed"])
    with pytest.raises(EmorlError, match="train.objectives"):
        load_config("tiny", ["train.objectives=[nope]"])
    with pytest.raises(EmorlError, match="k-SCST"):
        load_config("tiny", ["train.k=1"])
    with pytest.raises(EmorlError, match="data.split"):
        load_config("tiny", ["data.split=[0.5, 0.5, 0.5]"])
    with pytest.raises(EmorlError, match="unknown preset"):
        load_config("no-such-preset")


def test_yaml_roundtrip(tmp_path):
    cfg = load_config("default", ["train.max_steps=3"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


def test_describe_has_help_for_every_key():
    rows = describe()
    assert len(rows) > 40
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]


def test_dynaopt_round_length_must_be_positive():
    with pytest.raises(EmorlError, match="train.dynaopt_val_every must be >= 1"):
        load_config("tiny", ["train.dynaopt_val_every=0"])
    assert load_config("tiny", ["train.dynaopt_val_every=null"]).train.dynaopt_val_every is None

"""Data: the built-in task, each loader (on fixture files in the real formats), errors that name file and
line, and deterministic disjoint splits, checked against plainly written references."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import pytest

from emorl import data
from emorl.config import DataConfig, load_config
from emorl.data import Record, Splits, load_records, load_splits, split_records
from emorl.utils import EmorlError

FIX = Path(__file__).parent / "fixtures"


def _err(fn, *args, **kw) -> str:
    with pytest.raises(EmorlError) as e:
        fn(*args, **kw)
    return str(e.value)


def _write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


# --------------------------------------------------------------------------------------------- built-in task

def test_handwritten_set_is_complete_first_person_and_short():
    recs = data.handwritten_records()
    assert len(recs) >= 150
    assert len({r.prompt for r in recs}) == len(recs)
    for r in recs:
        assert r.reference and len(r.reference) > 20, r
        assert re.search(r"\b(I|I'm|I've|my|me|we|our|us)\b", r.prompt, re.IGNORECASE), r.prompt
        assert 1 <= len(re.findall(r"[.!?](?:\s|$)", r.prompt)) <= 3, r.prompt
        assert len(r.prompt) <= 200


def test_default_records_size_sources_and_determinism(monkeypatch):
    from emorl.data import builtin

    builtin._default_records.cache_clear()
    reads = []  # the chitchat filter (the slow part: a 40 MB JSON) runs once per process, not once per call
    filtered = builtin.chitchat_records
    monkeypatch.setattr(builtin, "chitchat_records", lambda *a: reads.append(1) or filtered(*a))
    recs = data.default_records()
    assert data.default_records() == recs and len(reads) == 1
    own, extra = data.handwritten_records(), data.chitchat_records()
    assert len(recs) >= 300 and len(extra) >= 100
    assert recs[:len(own)] == own and recs[len(own):] == extra  # no overlap to drop today
    assert all(r.reference is None for r in extra)
    keys = [re.sub(r"[^a-z]", "", r.prompt.lower()) for r in recs]
    assert len(set(keys)) == len(keys)
    assert data.default_records() == recs and data.default_records() is not data.default_records()
    for r in extra:
        assert 40 <= len(r.prompt) <= 240 and not r.prompt.endswith("?") and r.prompt[0] == r.prompt[0].upper()


def _conv(*turns: list[str]) -> dict:
    return {"messages": [[{"text": t, "timestamp": "", "sender": "a"} for t in turn] for turn in turns]}


def test_chitchat_filter_rules():
    convs = {
        "c1": _conv(["Hello", "How are you?"],
                    ["Yeah, I'm so stressed about my finals and I haven't slept in days."],  # filler cut, kept
                    ["I'm sad.", "My grandma is in the hospital again and nobody tells me anything."],  # joined
                    ["I am terrible at cooking so I eat cereal for dinner most nights."],  # skill, not feeling
                    ["Are you worried about the exam? I am worried about the exam tomorrow?"],  # question
                    ["I'm so stressed about my finals and I haven't slept in days!"]),  # repeat (same letters)
        "c2": _conv(["I feel so lost since I moved here, everything is different."],  # no trailing comma: kept
                    ["I was scared watching that movie last night with my roommate."],  # media
                    ["My dog died last week and the apartment feels empty now."],  # loss
                    ["haha I'm so nervous for my presentation tomorrow morning lol"],  # laughter
                    ["I'm worried you will not like the gift I got for your birthday."]),  # addressed to partner
    }
    got = [r.prompt for r in data.chitchat_records(convs)]
    assert got == [
        "I'm so stressed about my finals and I haven't slept in days.",
        "I'm sad. My grandma is in the hospital again and nobody tells me anything.",
        "I feel so lost since I moved here, everything is different.",
        "My dog died last week and the apartment feels empty now.",
    ]


# --------------------------------------------------------------------------------------------- PAIR

def test_pair_one_record_per_unique_prompt_with_seeded_hq_reference():
    path = FIX / "pair_sample.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    first = {}
    for row in rows:
        first.setdefault(row[0].strip(), row)
    recs = data.load_pair_csv(path, seed=0)
    assert [r.prompt for r in recs] == list(first)  # unique prompts, first occurrence, file order
    for r in recs:
        assert r.reference in first[r.prompt][1:3]
    assert data.load_pair_csv(path, seed=0) == recs
    refs = {s: [r.reference for r in data.load_pair_csv(path, seed=s)] for s in range(8)}
    assert any(v != refs[0] for v in refs.values())  # the seed picks among hq1/hq2
    assert load_records(DataConfig(source="pair", path=str(path), seed=3)) == data.load_pair_csv(path, seed=3)


def test_pair_header_is_optional(tmp_path):
    lines = (FIX / "pair_sample.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    no_header = _write(tmp_path, "p.csv", "".join(lines[1:]))
    assert data.load_pair_csv(no_header, seed=1) == data.load_pair_csv(FIX / "pair_sample.csv", seed=1)


def test_pair_errors_name_file_and_line(tmp_path):
    good = "p,h1,h2,m,l1,l2,l3,l4,l5\n"
    p = _write(tmp_path, "ten.csv", good + '"multi\nline",h1,h2,m,l1,l2,l3,l4,l5\n' + good.strip() + ",topic\n")
    msg = _err(data.load_pair_csv, p)
    assert f"{p}:4:" in msg and "10 fields" in msg and "topic" in msg  # line 4: the quoted row spans 2-3
    p = _write(tmp_path, "eight.csv", good + "p,h1,h2,m,l1,l2,l3,l4\n")
    assert f"{p}:2:" in _err(data.load_pair_csv, p)
    p = _write(tmp_path, "empty.csv", good + "\n  ,h1,h2,m,l1,l2,l3,l4,l5\n")
    msg = _err(data.load_pair_csv, p)
    assert f"{p}:3:" in msg and "empty prompt" in msg


# --------------------------------------------------------------------------------------------- Psych8k / JSON

def test_psych8k_maps_input_output():
    path = FIX / "psych8k_sample.json"
    plain = [Record(d["input"].strip(), d["output"].strip() or None) for d in json.loads(path.read_text())]
    assert load_records(DataConfig(source="psych8k", path=str(path))) == plain
    assert plain[-1].reference is None


def test_json_array_errors_name_the_line_of_the_item(tmp_path):
    items = [{"input": "first", "output": "a"}, {"instruction": "x", "output": "b"}]
    p = _write(tmp_path, "p8k.json", json.dumps(items, indent=2))
    line = json.dumps(items, indent=2).splitlines().index("  {", 2) + 1  # the second item's opening brace
    msg = _err(data.load_json_records, p, "input", "output")
    assert f"{p}:{line}:" in msg and "'input'" in msg and "instruction" in msg and "data.prompt_field" in msg
    p = _write(tmp_path, "bad.json", '[\n {"input": "a"},\n {"input": "b",}\n]')
    assert f"{p}:3:" in _err(data.load_json_records, p, "input")
    p = _write(tmp_path, "trailing.json", '[\n {"input": "a"},\n {"input": "b"},\n]')
    assert f"{p}:4:" in _err(data.load_json_records, p, "input")
    p = _write(tmp_path, "scalar.json", '[\n {"input": "a"},\n 3\n]')
    assert f"{p}:3:" in _err(data.load_json_records, p, "input")
    p = _write(tmp_path, "empty.json", '[{"input": "a"},\n{"input": "   "}]')
    assert f"{p}:2:" in _err(data.load_json_records, p, "input")
    assert data.load_json_records(_write(tmp_path, "none.json", " [ ] \n"), "input") == []


# --------------------------------------------------------------------------------------------- generic CSV / JSONL

def test_generic_csv_fields():
    cfg = DataConfig(source="csv", path=str(FIX / "prompts.csv"), prompt_field="statement", reference_field="reply")
    with open(FIX / "prompts.csv", newline="", encoding="utf-8") as f:
        plain = [Record(r["statement"], r["reply"] or None) for r in csv.DictReader(f)]
    assert load_records(cfg) == plain and len(plain) == 3 and plain[2].reference is None
    cfg.reference_field = None
    assert all(r.reference is None for r in load_records(cfg))


def test_generic_csv_errors(tmp_path):
    msg = _err(data.load_csv_records, FIX / "prompts.csv", "text")
    assert ":1:" in msg and "statement" in msg and "data.prompt_field" in msg
    assert "data.reference_field" in _err(data.load_csv_records, FIX / "prompts.csv", "statement", "answer")
    p = _write(tmp_path, "a.csv", 'prompt,ref\n"one, quoted\nover two lines",r\nthree,r,extra\n')
    assert f"{p}:4:" in _err(data.load_csv_records, p)
    p = _write(tmp_path, "b.csv", "prompt,ref\nok,r\n\n ,r\n")
    assert f"{p}:4:" in _err(data.load_csv_records, p)
    p = _write(tmp_path, "latin.csv", "prompt\nJ'ai \u00e9t\u00e9 triste\n", encoding="latin-1")
    assert "UTF-8" in _err(data.load_csv_records, p)
    assert "header" in _err(data.load_csv_records, _write(tmp_path, "empty.csv", "\n"))
    bom = _write(tmp_path, "bom.csv", "\ufeffprompt\nhello there\n")
    assert data.load_csv_records(bom) == [Record("hello there")]


def test_generic_jsonl_fields_and_errors(tmp_path):
    cfg = DataConfig(source="jsonl", path=str(FIX / "prompts.jsonl"), prompt_field="text", reference_field="response")
    lines = [json.loads(x) for x in (FIX / "prompts.jsonl").read_text().splitlines() if x.strip()]
    assert load_records(cfg) == [Record(d["text"], d["response"]) for d in lines]
    p = _write(tmp_path, "a.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n')
    msg = _err(data.load_json_records, p)
    assert f"{p}:3:" in msg and "not valid JSON" in msg
    p = _write(tmp_path, "b.jsonl", '{"prompt": "a"}\n{"prompt": 3}\n')
    assert f"{p}:2:" in _err(data.load_json_records, p)
    p = _write(tmp_path, "c.jsonl", '{"prompt": "a"}\n{"other": "b"}\n')
    assert f"{p}:2:" in _err(data.load_json_records, p)
    p = _write(tmp_path, "d.jsonl", '{"prompt": "a", "ref": 1}\n')
    assert f"{p}:1:" in _err(data.load_json_records, p, "prompt", "ref")


def test_missing_or_wrong_paths(tmp_path):
    assert "does not exist" in _err(load_records, DataConfig(source="csv", path=str(tmp_path / "nope.csv")))
    assert "source=hf" in _err(load_records, DataConfig(source="jsonl", path=str(tmp_path)))
    assert "data.path is required" in _err(load_records, DataConfig(source="pair"))


# --------------------------------------------------------------------------------------------- Hugging Face

def test_hf_from_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"q": ["I feel alone.", "Work is too much."], "a": ["Lonely.", None]})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "ds"), prompt_field="q", reference_field="a")
    assert load_records(cfg) == [Record("I feel alone.", "Lonely."), Record("Work is too much.", None)]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    cfg.path, cfg.hf_split = str(tmp_path / "dd"), "test"
    assert load_records(cfg) == [Record("Work is too much.", None)]
    cfg.hf_split = "validation"
    assert "data.hf_split" in _err(load_records, cfg)
    cfg.hf_split, cfg.prompt_field = "train", "text"
    assert "data.prompt_field" in _err(load_records, cfg)
    datasets.Dataset.from_dict({"q": ["ok", ""]}).save_to_disk(str(tmp_path / "e"))
    assert "row 2" in _err(data.load_hf, str(tmp_path / "e"), "q")


def test_hf_by_name_offline_says_network():
    msg = _err(load_records, DataConfig(source="hf", path="nobody/no-such-dataset"))
    assert "network" in msg and "save_to_disk" in msg


# --------------------------------------------------------------------------------------------- splits

def _recs(n: int) -> list[Record]:
    return [Record(f"statement {i}") for i in range(n)]


def test_split_matches_plain_reference_and_is_disjoint():
    recs = _recs(103)
    for shuffle, seed, cap in [(True, 0, None), (True, 7, 50), (False, 0, None), (False, 0, 10)]:
        s = split_records(recs, [0.8, 0.1, 0.1], shuffle=shuffle, seed=seed, max_prompts=cap)
        order = list(recs)
        if shuffle:
            random.Random(seed).shuffle(order)
        order = order[:cap] if cap else order
        a, b = int(len(order) * 0.8), int(len(order) * 0.9)
        assert (s.train, s.validation, s.test) == (order[:a], order[a:b], order[b:])
        names = [set(r.prompt for r in part) for part in (s.train, s.validation, s.test)]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(split_records(recs, [0.8, 0.1, 0.1]).sizes().values()) == 103


def test_split_seeds_and_file_order():
    recs = _recs(40)
    assert split_records(recs, [0.5, 0.25, 0.25], seed=1) == split_records(recs, [0.5, 0.25, 0.25], seed=1)
    assert split_records(recs, [0.5, 0.25, 0.25], seed=1) != split_records(recs, [0.5, 0.25, 0.25], seed=2)
    s = split_records(recs, [0.5, 0.25, 0.25], shuffle=False)
    assert s.train == recs[:20] and s.validation == recs[20:30] and s.test == recs[30:]
    assert s["test"] is s.test and s.sizes() == {"train": 20, "validation": 10, "test": 10}
    assert "unknown split" in _err(s.__getitem__, "dev")


def test_split_drops_repeated_prompts_before_splitting():
    recs = [Record("same", "a"), *_recs(18), Record("same", "b"), Record("statement 3", "c")]
    s = split_records(recs, [0.6, 0.2, 0.2], seed=0)
    allp = [r.prompt for part in (s.train, s.validation, s.test) for r in part]
    assert sorted(allp) == sorted({r.prompt for r in recs}) and len(allp) == 19
    assert Record("same", "a") in s.train + s.validation + s.test  # first occurrence kept


def test_split_errors():
    assert "summing to 1" in _err(split_records, _recs(10), [0.8, 0.1])
    assert "summing to 1" in _err(split_records, _recs(10), [0.9, 0.2, -0.1])
    assert "summing to 1" in _err(split_records, _recs(10), [math.nan, 0.5, 0.5])
    assert "max_prompts" in _err(split_records, _recs(10), [0.8, 0.1, 0.1], max_prompts=0)
    assert "validation split empty" in _err(split_records, _recs(5), [0.8, 0.1, 0.1])
    assert "no prompts" in _err(split_records, [], [0.8, 0.1, 0.1])
    s = split_records(_recs(5), [1.0, 0.0, 0.0])  # a zero fraction may be empty
    assert isinstance(s, Splits) and len(s.train) == 5 and not s.validation and not s.test


def test_load_splits_of_presets():
    s = load_splits(load_config("tiny").data)  # max_prompts 60 of the built-in task
    assert s.sizes() == {"train": 30, "validation": 12, "test": 18}  # the default split 50/20/30
    full = load_splits(load_config("default").data)
    assert sum(full.sizes().values()) == len(data.default_records()) == 332
    assert full.sizes() == {"train": 166, "validation": 66, "test": 100}  # test >= 100, validation >= 60
    assert load_splits(load_config("default").data) == full


def test_long_statement_is_cut_and_the_template_kept(tiny_base, caplog, monkeypatch):
    import logging

    import emorl.prompts as data

    monkeypatch.setattr(data, "_warned_truncation", False)
    tok = tiny_base.tokenizer
    long = "I keep thinking about the move and my job and my sister. " * 30 + "THE END"
    short = "I feel sad."
    texts = data.format_prompts(tok, [long, short, long + " again"], False, "You are kind.")
    assert len(tok(texts[0], add_special_tokens=False)["input_ids"]) > 300
    with caplog.at_level(logging.DEBUG, logger="emorl.prompts"):
        enc = data.encode_prompts(tok, texts, 64, False)
        data.encode_prompts(tok, texts, 64, False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("2 of 3 prompts are longer than "
                                                                      "model.max_prompt_tokens=64")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]  # once, then debug
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert int(mask.sum(1).max()) <= 64  # content cut to the limit
    assert ids.shape[1] % data.PAD_MULTIPLE == 0 and int((mask == 0).sum(1).min()) >= 1  # aligned, >= 1 pad each
    for row in (0, 2):
        text = tok.decode(ids[row][mask[row].bool()])
        assert text.startswith("<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nI keep thinking "
                               "about the move"), text
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n"), text
        assert "THE END" not in text
        assert 56 <= int(mask[row].sum()) <= 64  # cut to fit, not far below
    plain = tok(texts[1], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert ids[1][mask[1].bool()].tolist() == plain.tolist()  # a prompt that fits is untouched


def test_long_statement_is_cut_for_seq2seq(tiny_t5_base, monkeypatch):
    import emorl.prompts as data

    monkeypatch.setattr(data, "_warned_truncation", False)
    tok = tiny_t5_base.tokenizer
    texts = data.format_prompts(tok, ["My week was long and hard. " * 40], True)
    enc = data.encode_prompts(tok, texts, 32, True)
    text = tok.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert enc["input_ids"].shape[1] <= 32
    assert text.startswith("My week was long") and text.rstrip().endswith("hard [SEP]"), text

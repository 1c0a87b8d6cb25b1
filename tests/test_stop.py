"""Stop strings (``generation.stop``): the config field, the decoder (the stop string kept with ``include_stop``,
each row's finish reason), transformers' ``generate(stop_strings=...)`` as the reference, the training rollouts'
completion mask, the report's ended % / EOS %, and a tiny study that stops."""

from __future__ import annotations

import json

import pytest
import torch

from emorl.config import GenerationConfig, LoraConfig, ModelConfig, load_config
from emorl.data import encode_prompts, format_prompts
from emorl.decoding import generation_kwargs, plain_generation_config
from emorl.ensemble import EnsembleModel
from emorl.models import add_adapters, eos_ids, load_base
from emorl.report.ended import COLUMN, EOS_COLUMN, ended_percent, with_ended
from emorl.utils import EmorlError, append_jsonl

PROMPTS = ["I lost my job today.", "My cat is sick.", "Nobody calls me anymore and the evenings are long.",
           "I failed the exam again.", "My sister moved away.", "I can't sleep."]
T = 10


def _with_adapter(base):
    add_adapters(base, ["calm"], LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    return base


@pytest.fixture(scope="module")
def ens() -> EnsembleModel:
    return EnsembleModel(_with_adapter(load_base(ModelConfig(name="tiny-llama", system_prompt=None))))


def _pick_stop(tok, free: torch.Tensor) -> tuple[str, list[int | None]]:
    """A word the free (unstopped) replies generate mid-way in some rows but not all, and each row's expected end:
    the first step whose decoded prefix holds it (None: never)."""
    special = set(tok.all_special_ids)
    for t in torch.unique(free[:, 1:]).tolist():
        piece = tok.decode([t]).strip()
        if t in special or len(piece) < 2 or not piece.isascii() or not piece.isalpha():
            continue
        ends = [next((i for i in range(free.shape[1]) if piece in tok.decode(row[: i + 1].tolist())), None)
                for row in free]
        if any(e is None for e in ends) and any(e is not None and e >= 1 for e in ends):
            return piece, ends
    raise AssertionError("the tiny model should generate some word mid-way in a few rows")


def test_config_stop_round_trips_and_bad_stops_are_named(tmp_path):
    cfg = load_config("tiny", ['eval.generation.stop=[".", "!", "?"]'])
    assert cfg.eval.generation.stop == [".", "!", "?"] and cfg.train.generation.stop == []
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.eval.generation == cfg.eval.generation
    assert generation_kwargs(again.eval.generation)["stop"] == [".", "!", "?"]
    assert generation_kwargs(again.eval.generation)["include_stop"] is True
    with pytest.raises(EmorlError, match=r"train\.generation\.stop must be a list of non-empty strings"):
        load_config("tiny", ['train.generation.stop=[".", ""]'])
    with pytest.raises(EmorlError, match=r"search\.generation\.stop"):
        load_config("tiny", ["search.generation.stop=."])  # a string, not a list


def test_default_preset_stops_at_the_first_sentence_end_everywhere():
    cfg = load_config("default")
    for gen in (cfg.train.generation, cfg.search.generation, cfg.eval.generation):
        assert gen.stop == [".", "!", "?"]
    # rollouts cap at 24 (a rollout batch runs to its longest row: the cap is training's cost); the search decodes
    # exactly as the evaluation, at 32
    assert cfg.train.generation.max_new_tokens == 24
    assert cfg.search.generation == cfg.eval.generation and cfg.eval.generation.max_new_tokens == 32
    assert cfg.model.system_prompt == "You are a warm, supportive listener. Reply to the person in one short sentence."


def test_decoder_keeps_the_stop_string_and_ends_the_row(ens: EnsembleModel):
    free = ens.generate(PROMPTS, [1.0], max_new_tokens=T)
    assert set(free.finish) <= {"eos", "length"}  # no stop string given: no row says "stop"
    piece, ends = _pick_stop(ens.tokenizer, free.token_ids)
    kept = ens.generate(PROMPTS, [1.0], max_new_tokens=T, stop=[piece], include_stop=True)
    cut = ens.generate(PROMPTS, [1.0], max_new_tokens=T, stop=[piece])
    assert torch.equal(kept.token_ids, cut.token_ids)  # include_stop changes the text only
    for b, e in enumerate(ends):
        n = int(kept.lengths[b])
        if e is None or int(free.lengths[b]) <= e:  # never generated, or EOS came first: as without the stop
            assert n == int(free.lengths[b]) and kept.texts[b] == free.texts[b]
            assert kept.finish[b] == free.finish[b]
            continue
        assert n == e + 1 and kept.finish[b] == "stop"
        assert torch.equal(kept.token_ids[b, :n], free.token_ids[b, :n])
        assert (kept.token_ids[b, n:] == ens.pad).all()
        assert kept.texts[b].endswith(piece) and kept.texts[b].count(piece) == 1
        assert piece not in cut.texts[b] and kept.texts[b].startswith(cut.texts[b])


def test_decoder_with_stop_equals_transformers_generate_with_stop_strings(ens: EnsembleModel):
    """A single adapter, greedy: the decoder's tokens equal peft/transformers' generate(stop_strings=...)'s."""
    free = ens.generate(PROMPTS, [1.0], max_new_tokens=T)
    piece, _ = _pick_stop(ens.tokenizer, free.token_ids)
    res = ens.generate(PROMPTS, [1.0], max_new_tokens=T, stop=[piece], include_stop=True)
    base, tok = ens.base, ens.tokenizer
    enc = encode_prompts(tok, format_prompts(tok, PROMPTS, False, None), 128, False)
    with torch.no_grad(), plain_generation_config(base.model):
        out = base.model.generate(**enc, max_new_tokens=T, do_sample=False, stop_strings=[piece], tokenizer=tok,
                                  pad_token_id=ens.pad, eos_token_id=ens.eos)
    ref = out[:, enc["input_ids"].shape[1]:]
    assert "stop" in res.finish
    assert torch.equal(res.token_ids[:, : ref.shape[1]], ref)
    assert (res.token_ids[:, ref.shape[1]:] == ens.pad).all()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_rollouts_stop_and_their_mask_ends_at_the_stop(model: str):
    """Training rollouts stop where the decoder stops: the completion mask ends at the stopping token (the pads
    ``generate`` puts after it, here the EOS id itself, are not in the loss), and the text keeps the stop string;
    causal and seq2seq (whose replies follow the decoder's start token)."""
    from emorl.train.rollout import sample_rollouts

    base = _with_adapter(load_base(ModelConfig(name=model, system_prompt=None)))
    # sampled with fixed seeds (each row draws its own uniforms, so a row samples the same tokens up to its stop)
    free = sample_rollouts(base.model, base, [("calm", PROMPTS)], 1, GenerationConfig(max_new_tokens=T), 128, [0])[0]
    piece, ends = _pick_stop(base.tokenizer, free.batch.completion_ids)
    stopped = sample_rollouts(base.model, base, [("calm", PROMPTS)], 1,
                              GenerationConfig(max_new_tokens=T, stop=[piece]), 128, [0])[0]
    free_len = free.batch.completion_mask.sum(1).long().tolist()
    mask_len = stopped.batch.completion_mask.sum(1).long().tolist()
    assert base.tokenizer.pad_token_id in eos_ids(base)  # the case where a pad after a stop looks like an EOS
    n_stopped = 0
    for b, e in enumerate(ends):
        if e is None or free_len[b] <= e:
            assert mask_len[b] == free_len[b] and stopped.texts[b] == free.texts[b]
            continue
        n_stopped += 1
        assert mask_len[b] == e + 1, (b, e, mask_len[b])
        row = stopped.batch.completion_ids[b]
        assert torch.equal(row[: e + 1], free.batch.completion_ids[b, : e + 1])
        assert (stopped.batch.completion_mask[b, e + 1:] == 0).all()
        assert stopped.texts[b].endswith(piece) and stopped.texts[b].count(piece) == 1
    assert n_stopped >= 1 and stopped.batch.completion_ids.shape[1] > min(mask_len)  # pads follow a stopped row


def test_completion_mask_ends_at_a_stop_or_the_first_eos():
    from emorl.train.kscst import completion_mask

    eos, pad = 2, 2
    ids = torch.tensor([[5, 6, 7, pad, pad], [5, 2, pad, pad, pad], [5, 6, 7, 8, 9]])
    stopped = torch.zeros_like(ids, dtype=torch.bool)
    stopped[0, 2] = True  # row 0 stopped at its third token; generate padded it with pad = the EOS id
    assert completion_mask(ids, [eos]).tolist()[0] == [1, 1, 1, 1, 0]  # without the stop: one pad taken as EOS
    assert completion_mask(ids, [eos], stopped).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_report_counts_ended_and_eos_separately(tmp_path):
    # 10 replies of one method, one per prompt: 5 stopped at a sentence end, 2 ended with EOS, 3 cut at the limit
    # -> ended 7/10 = 70 %, EOS 2/10 = 20 %
    finishes = ["stop"] * 5 + ["eos"] * 2 + ["length"] * 3
    rows = [{"seed": 0, "prompt": f"p{i}", "tokens": 32 if f == "length" else 9, "finish": f}
            for i, f in enumerate(finishes)]
    ended, ci = ended_percent(rows, 32)
    eos, eos_ci = ended_percent(rows, 32, ("eos",))
    assert ended == pytest.approx(70.0) and eos == pytest.approx(20.0)
    assert ci[0] <= 70.0 <= ci[1] and eos_ci[0] <= 20.0 <= eos_ci[1]
    # an older file without finish reasons: fewer tokens than the limit = EOS
    old = [{"prompt": "a", "tokens": 5}, {"prompt": "b", "tokens": 32}]
    assert ended_percent(old, 32)[0] == 50.0 and ended_percent(old, 32, ("eos",))[0] == 50.0
    for r in rows:
        append_jsonl(tmp_path / "eval" / "replies" / "emorl.jsonl", r)
    results = {"generation": {"max_new_tokens": 32}, "methods": {"emorl": {}, "base": {}}}
    cols, out = with_ended(tmp_path, results, (["Method", "Length (tokens)", "Tokens/s"], [["e", "9", "1"],
                                                                                        ["b", "9", "1"]]))
    assert cols == ["Method", "Length (tokens)", COLUMN, EOS_COLUMN, "Tokens/s"]
    assert out[0][2].startswith("70 [") and out[0][3].startswith("20 [") and out[1][2:4] == ["–", "–"]
    with pytest.raises(ValueError, match="finish"):
        ended_percent([{"prompt": "a", "tokens": 3, "finish": "done"}], 32)


def test_tiny_study_with_stop_strings_reports_both_columns(tmp_path):
    """`emorl run --preset tiny` with a stop string every generation block uses: replies record how they ended,
    some stop, and the report shows ended % and EOS %. ("e" ends a reply at its first token holding an "e": the
    random tiny model rarely writes a full stop.)"""
    from emorl.cli import main

    run = tmp_path / "run"
    stop = ['train.generation.stop=["e"]', 'search.generation.stop=["e"]', 'eval.generation.stop=["e"]']
    assert main(["run", "--preset", "tiny", "--output", str(run), "--no-progress", *stop]) == 0
    rows = [json.loads(x) for x in (run / "eval" / "replies" / "base.jsonl").read_text().splitlines()]
    assert {r["finish"] for r in rows} <= {"eos", "stop", "length"} and any(r["finish"] == "stop" for r in rows)
    for r in rows:
        if r["finish"] == "stop":
            assert r["reply"].endswith("e") and r["tokens"] <= 8
    report = (run / "report.md").read_text()
    assert COLUMN in report and EOS_COLUMN in report
    assert "ending at the first stop string (`e`, kept in the reply)" in report

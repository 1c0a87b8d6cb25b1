"""The one decoding path: base-anchored mixing against its definitions (w = 0 is the base, sum w = 1 is the convex
mix), no model generation_config processors anywhere, and the prompt format an adapter records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emorl.cli import main
from emorl.config import GenerationConfig, LoraConfig, ModelConfig, load_config
from emorl.data import encode_prompts, format_prompts
from emorl.decoding import parse_mix, plain_generation_config
from emorl.ensemble import EnsembleModel
from emorl.models import AdapterInfo, adapters_disabled, add_adapters, load_base, save_adapter
from emorl.utils import EmorlError

NAMES = ["ref", "emp", "flu"]
PROMPTS = ["I lost my job today.", "My cat is sick.", "Nobody calls me anymore."]
T = 6


def _ensemble(name: str) -> EnsembleModel:
    base = load_base(ModelConfig(name=name, system_prompt=None))
    add_adapters(base, NAMES, LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3, generator=g)
    return EnsembleModel(base)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-t5"])
def ens(request: pytest.FixtureRequest) -> EnsembleModel:
    return _ensemble(request.param)


def _base_logits(ens: EnsembleModel) -> torch.Tensor:
    """First-step logits of the model with its adapters switched off, by a plain forward."""
    b = ens.base
    enc = encode_prompts(b.tokenizer, format_prompts(b.tokenizer, PROMPTS, b.is_seq2seq, None), 128, b.is_seq2seq)
    with torch.no_grad(), adapters_disabled(b.model):
        if b.is_seq2seq:
            start = torch.full((len(PROMPTS), 1), ens.stream.decoder_start)
            return b.model(**enc, decoder_input_ids=start).logits[:, -1]
        return b.model(**enc).logits[:, -1]


def test_anchored_zero_point_is_the_base(ens: EnsembleModel) -> None:
    res = ens.generate(PROMPTS, [0.0, 0.0, 0.0], max_new_tokens=T, output_scores=True)
    assert res.stats["anchored"]
    torch.testing.assert_close(res.scores[0][:, 0], _base_logits(ens), rtol=1e-4, atol=1e-4)
    b = ens.base
    enc = encode_prompts(b.tokenizer, format_prompts(b.tokenizer, PROMPTS, b.is_seq2seq, None), 128, b.is_seq2seq)
    with torch.no_grad(), adapters_disabled(b.model), plain_generation_config(b.model):
        out = b.model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=ens.pad)
    ref = out[:, 1:] if b.is_seq2seq else out[:, enc["input_ids"].shape[1]:]
    assert torch.equal(res.token_ids[:, : ref.shape[1]], ref)
    for mode in ("logits", "params"):  # every anchored mode: w = 0 is the base
        assert torch.equal(ens.generate(PROMPTS, [0, 0, 0], mode=mode, max_new_tokens=T).token_ids, res.token_ids)


@pytest.mark.parametrize("mode", ["hidden", "logits"])
def test_anchored_equals_convex_where_weights_sum_to_one(ens: EnsembleModel, mode: str) -> None:
    pts = [[0.5, 0.25, 0.25], [0.0, 0.75, 0.25], [1.0, 0.0, 0.0]]
    kw = {"mode": mode, "max_new_tokens": T, "do_sample": True, "seed": 4, "top_k": 0}
    anchored = ens.generate(PROMPTS, pts, anchor="base", **kw)
    convex = ens.generate(PROMPTS, pts, anchor="none", **kw)
    assert not anchored.stats["anchored"]  # no point needs the base stream
    assert torch.equal(anchored.token_ids, convex.token_ids)
    # sampled, scale counts when anchored: 2 * w is a different policy, but the same convex direction
    doubled = (2 * np.array(pts)).tolist()
    assert torch.equal(ens.generate(PROMPTS, doubled, anchor="none", **kw).token_ids, convex.token_ids)
    assert not torch.equal(ens.generate(PROMPTS, doubled, anchor="base", **kw).token_ids, convex.token_ids)


def test_parse_mix_names_modes_and_rules() -> None:
    assert parse_mix("hidden") == ("hidden", "base")
    assert parse_mix("hidden", "none") == ("hidden", "none")
    assert parse_mix("hidden-convex") == ("hidden", "none")
    assert parse_mix("params") == ("params", "base") and parse_mix("params-convex") == ("params", "none")
    assert parse_mix("probs") == ("probs", "none")  # a mixture of distributions: always convex
    with pytest.raises(EmorlError, match="hidden-convex, params-convex"):
        parse_mix("average")


def test_no_path_applies_the_models_generation_config_processors() -> None:
    """A model whose generation_config sets repetition_penalty=2 (and no-repeat n-grams) decodes the same in the
    ensemble decoder and in the training rollouts (transformers' generate) as without: one rule everywhere."""
    from emorl.train.rollout import sample_rollouts

    ens = _ensemble("tiny-llama")
    gen = GenerationConfig(do_sample=True, max_new_tokens=T, top_k=0)
    lm = ens.lm

    def decode() -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = ens.generate(PROMPTS, [[1, 0, 0], [0.3, 0.3, 0.3]], max_new_tokens=T, do_sample=True, seed=2, top_k=0)
        ros = sample_rollouts(ens.model, ens.base, [("ref", PROMPTS), ("emp", PROMPTS)], 2, gen, 128, seeds=[5, 6])
        return res.token_ids, [r.batch.completion_ids for r in ros]

    plain = decode()
    lm.generation_config.repetition_penalty = 2.0
    lm.generation_config.no_repeat_ngram_size = 2
    try:
        penalised = decode()
    finally:
        lm.generation_config.repetition_penalty = 1.0
        lm.generation_config.no_repeat_ngram_size = 0
    assert torch.equal(plain[0], penalised[0])
    for x, y in zip(plain[1], penalised[1], strict=True):
        assert torch.equal(x, y)
    # and the penalty would have changed them: transformers applies it when left in place
    with torch.no_grad():
        enc = encode_prompts(ens.tokenizer, format_prompts(ens.tokenizer, PROMPTS, False, None), 128, False)
        lm.generation_config.repetition_penalty = 2.0
        try:
            with adapters_disabled(ens.model):
                pen = ens.model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=ens.pad)
        finally:
            lm.generation_config.repetition_penalty = 1.0
        with adapters_disabled(ens.model):
            ref = ens.model.generate(**enc, max_new_tokens=T, do_sample=False, pad_token_id=ens.pad)
    assert not torch.equal(pen, ref)


def test_adapters_decode_with_the_prompt_format_they_were_trained_with(tmp_path: Path, capsys) -> None:
    """`--adapters DIR` and `--run RUN --names X` give the same samples: the adapter's emorl.json records the system
    prompt and max_prompt_tokens it was trained with, and `--adapters` loads the base with them."""
    cfg = load_config("tiny", ["model.system_prompt=Be kind.", "model.max_prompt_tokens=24"])
    run = tmp_path / "run"
    cfg.save(run / "config.yaml")
    base = load_base(cfg.model)
    model = add_adapters(base, ["reflection"], cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    save_adapter(model, "reflection", run / "adapters" / "reflection",
                 AdapterInfo(objective="reflection", base=base.identity, prompt=base.prompt_format))
    assert json.loads((run / "adapters" / "reflection" / "emorl.json").read_text())["prompt"] == {
        "form": "chat-template", "system_prompt": "Be kind.", "max_prompt_tokens": 24}
    long = "I keep thinking about the day I lost my job, the office, the people, and what comes next. " * 3
    common = ["--prompt", long, "--prompt", "My cat is sick.", "--weights", "1", "--temperature", "1.0",
              "--seed", "3", "--max-new-tokens", "6"]
    assert main(["generate", "--run", str(run), "--names", "reflection", *common]) == 0
    via_run = capsys.readouterr().out
    assert main(["generate", "--adapters", str(run / "adapters" / "reflection"), *common]) == 0
    via_adapters = capsys.readouterr().out
    assert [json.loads(x)["reply"] for x in via_run.splitlines()] == \
        [json.loads(x)["reply"] for x in via_adapters.splitlines()]

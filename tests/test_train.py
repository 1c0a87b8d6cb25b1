"""The trainer on the tiny preset: learning, resume equivalence, interruption, metadata, bad input."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emorl.config import ModelConfig, load_config
from emorl.data import Record
from emorl.models import load_adapters, load_base, read_adapter_info
from emorl.rewards import RewardError
from emorl.train.policy import coefficient_of_variation_converged
from emorl.train.trainer import Trainer
from emorl.utils import EmorlError


@dataclass
class Splits:
    train: list
    validation: list
    test: list


RECORDS = [Record(f"I feel worried about problem number {i} at home.") for i in range(40)]
SPLITS = Splits(RECORDS[:30], RECORDS[30:38], RECORDS[38:])


class Capitals:
    """Share of words starting with a capital letter: ~0.27 for the random tiny model, learnable quickly."""

    name = "capitals"

    def __call__(self, prompts, responses):
        return np.array([sum(w[:1].isupper() for w in r.split()) / max(1, len(r.split())) for r in responses])


class Short:
    name = "short"

    def __call__(self, prompts, responses):
        return np.array([1.0 / (1 + len(r)) for r in responses])


def _cfg(*overrides):
    return load_config("tiny", ["objectives={capitals: {type: length}, short: {type: length}}", "train.max_steps=4",
                                "train.val_every=2", "train.checkpoint_every=2", *overrides])


def _trainer(tmp_path, cfg, **kw):
    rewards = {"capitals": Capitals(), "short": Short()}
    return Trainer(cfg, tmp_path, rewards=kw.pop("rewards", rewards), splits=SPLITS, progress=False, **kw)


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_learning_raises_the_reward_clearly(tmp_path):
    cfg = _cfg("train.objectives=[capitals]", "train.max_steps=20", "train.lr=2e-2", "train.batch_size=4", "train.k=4",
               "train.val_every=5", "train.val_prompts=8", "train.val_samples=2", "train.reward_transform=identity",
               "lora.r=8", "lora.alpha=16", "train.convergence_threshold=0")
    info = _trainer(tmp_path, cfg).train()["capitals"]
    values = [c["value"] for c in info.curve]
    assert len(values) == 5
    assert values[0] < 0.35, values
    assert max(values[-2:]) > values[0] + 0.2, values  # ~0.27 -> ~0.6 measured


def test_single_strategy_writes_one_adapter_per_objective(tmp_path, tiny_base):
    cfg = _cfg()
    infos = _trainer(tmp_path, cfg, base=tiny_base).train()
    assert set(infos) == {"capitals", "short"}
    for name in infos:
        d = tmp_path / "adapters" / name
        assert (d / "adapter_config.json").exists() and (d / "adapter_model.safetensors").exists()
        meta = json.loads((d / "emorl.json").read_text())
        assert meta["objective"] == name and meta["strategy"] == "single"
        assert meta["steps"] == 4 and meta["prompts_consumed"] == 8 and meta["wall_time_s"] > 0
        assert meta["base"]["fingerprint"] == tiny_base.fingerprint
        assert [c["step"] for c in meta["curve"]] == [0, 2, 4]
        assert meta["extra"]["finished"] is True
    # peft's own loader reads it; the two adapters are different
    from peft import PeftModel

    fresh = load_base(ModelConfig(name="tiny-llama"))
    pm = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapters" / "short"), adapter_name="short")
    assert "short" in pm.peft_config
    a, b = _weights(tmp_path / "adapters" / "capitals"), _weights(tmp_path / "adapters" / "short")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "logs" / "single-capitals+short.jsonl").read_text().splitlines()]
    assert any("capitals/rewards/capitals/mean" in r for r in log)
    assert not (tmp_path / "checkpoints" / "single-capitals+short").exists()  # cleaned after success


def test_resume_after_crash_gives_identical_weights(tmp_path):
    cfg = _cfg()
    _trainer(tmp_path / "a", cfg).train()

    class Crash(Exception):
        pass

    def crash_after_step3(tr):
        if tr.policies[0].step == 3:
            raise Crash  # simulates a kill after the step-2 checkpoint: step 3 is lost

    with pytest.raises(Crash):
        _trainer(tmp_path / "b", cfg, callbacks=[crash_after_step3]).train()
    assert (tmp_path / "b" / "checkpoints" / "single-capitals+short" / "state.json").exists()
    _trainer(tmp_path / "b", cfg).train(resume=True)
    for name in ("capitals", "short"):
        wa, wb = _weights(tmp_path / "a" / "adapters" / name), _weights(tmp_path / "b" / "adapters" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
        ca = json.loads((tmp_path / "a" / "adapters" / name / "emorl.json").read_text())["curve"]
        cb = json.loads((tmp_path / "b" / "adapters" / name / "emorl.json").read_text())["curve"]
        assert [c["scores"] for c in ca] == [c["scores"] for c in cb]


def test_request_stop_checkpoints_and_resume_finishes(tmp_path):
    cfg = _cfg("train.checkpoint_every=100")

    def stop_at_1(tr):
        if tr.policies[0].step == 1:
            tr.request_stop()

    assert _trainer(tmp_path, cfg, callbacks=[stop_at_1]).train() == {}
    state = json.loads((tmp_path / "checkpoints" / "single-capitals+short" / "state.json").read_text())
    assert state["trainer"]["policies"]["capitals"]["step"] == 1
    infos = _trainer(tmp_path, cfg).train(resume=True)
    assert infos["capitals"].steps == 4


def test_finished_adapters_are_skipped_unless_forced(tmp_path):
    cfg = _cfg("train.max_steps=2")
    _trainer(tmp_path, cfg).train()
    before = (tmp_path / "adapters" / "short" / "adapter_model.safetensors").read_bytes()
    assert _trainer(tmp_path, cfg).train() == {}
    assert (tmp_path / "adapters" / "short" / "adapter_model.safetensors").read_bytes() == before
    assert set(_trainer(tmp_path, cfg, force=True).train()) == {"capitals", "short"}


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = _cfg("train.checkpoint_every=1")

    def stop(tr):
        tr.request_stop()

    _trainer(tmp_path, cfg, callbacks=[stop]).train()
    with pytest.raises(EmorlError, match=r"config changed in train.lr"):
        _trainer(tmp_path, _cfg("train.checkpoint_every=1", "train.lr=0.5")).train(resume=True)
    # budgets may change
    assert _trainer(tmp_path, _cfg("train.checkpoint_every=1", "train.max_steps=3")).train(resume=True)


@pytest.mark.parametrize("strategy", ["uniform", "dynaopt", "fixed", "gdpo"])
def test_baselines_train_one_policy_on_all_objectives(tmp_path, strategy):
    extra = ["train.fixed_weights=[0.7, 0.3]"] if strategy == "fixed" else []
    cfg = _cfg(f"train.strategy={strategy}", "train.max_steps=2", *extra)
    infos = _trainer(tmp_path, cfg).train()
    assert list(infos) == [strategy]
    meta = json.loads((tmp_path / "baselines" / strategy / "emorl.json").read_text())
    assert meta["objectives"] == ["capitals", "short"]
    assert set(meta["curve"][0]["scores"]) == {"capitals", "short"}
    if strategy == "dynaopt":
        assert len(meta["extra"]["weights_log"]) == len(meta["curve"])


def test_dynaopt_in_the_trainer_updates_weights_once_per_round(tmp_path, monkeypatch):
    """Validations at steps 0, 2, 4 and at the stop (5): λ changes only at the first step of rounds 2 and 3."""
    from emorl.train.strategies import DynaOptWeighting

    events = []
    monkeypatch.setattr(DynaOptWeighting, "before_step",
                        lambda self, f=DynaOptWeighting.before_step: (events.append("step"), f(self))[1])
    monkeypatch.setattr(DynaOptWeighting, "on_validation",
                        lambda self, m, f=DynaOptWeighting.on_validation: (events.append("val"), f(self, m))[1])
    monkeypatch.setattr("emorl.train.strategies.Exp3.draw", lambda self, rng: 0)  # always up-weight capitals
    cfg = _cfg("train.strategy=dynaopt", "train.max_steps=5")
    _trainer(tmp_path, cfg).train()
    assert events == ["val", "step", "step", "val", "step", "step", "val", "step", "val"]
    meta = json.loads((tmp_path / "baselines" / "dynaopt" / "emorl.json").read_text())
    log = meta["extra"]["weights_log"]
    assert [e["arm"] for e in log] == [None, None, 0, 0]
    w = [e["weights"][0] for e in log]
    assert w[0] == w[1] == 0.5 and w[1] < w[2] < w[3]  # uniform until step 3, one up-weight each at steps 3 and 5
    assert all(0 <= e["reward"] <= 1 for e in log[2:])


def test_bad_reward_stops_with_named_error_and_keeps_checkpoint(tmp_path):
    class Broken:
        name = "short"

        def __init__(self):
            self.calls = 0

        def __call__(self, prompts, responses):
            self.calls += 1
            out = np.full(len(responses), 0.5)
            if self.calls > 5:
                out[1] = np.nan
            return out

    cfg = _cfg("train.objectives=[short]", "train.checkpoint_every=1", "train.max_steps=10")
    with pytest.raises(RewardError, match="short") as e:
        _trainer(tmp_path, cfg, rewards={"short": Broken()}).train()
    assert "nan" in str(e.value).lower()
    ckpt = tmp_path / "checkpoints" / "single-short"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["trainer"]["policies"]["short"]["step"] >= 1
    load_file(str(ckpt / "weights.safetensors"))  # still readable


def test_adapter_from_another_base_is_refused(tmp_path):
    cfg = _cfg("train.objectives=[short]", "train.max_steps=1")
    _trainer(tmp_path, cfg).train()
    other = load_base(ModelConfig(name="tiny-llama", seed=1))
    with pytest.raises(EmorlError, match="fingerprint"):
        load_adapters(other, [tmp_path / "adapters" / "short"])
    same = load_base(ModelConfig(name="tiny-llama"))
    model, infos = load_adapters(same, [tmp_path / "adapters" / "short"])
    assert infos["short"].steps == 1 and read_adapter_info(tmp_path / "adapters" / "short").objective == "short"


def test_convergence_rule():
    assert not coefficient_of_variation_converged([0.5] * 19, 20, 0.015)
    assert coefficient_of_variation_converged([0.5] * 20, 20, 0.015)
    assert not coefficient_of_variation_converged([0.1, 0.9] * 10, 20, 0.015)
    assert not coefficient_of_variation_converged([0.5] * 20, 20, 0.0)


def test_empty_split_is_an_error(tmp_path):
    with pytest.raises(EmorlError, match="validation split is empty"):
        Trainer(_cfg(), tmp_path, splits=Splits(RECORDS, [], []), rewards={}, progress=False)


def test_seq2seq_trains(tmp_path):
    cfg = _cfg("model.name=tiny-t5", "train.objectives=[short]", "train.max_steps=2")
    info = _trainer(tmp_path, cfg).train()["short"]
    assert info.steps == 2 and len(info.curve) == 2


def test_cli_train_tiny_preset_end_to_end(tmp_path):
    """`emorl train` on the tiny preset with the real built-in rewards and data: adapters, config, logs."""
    from emorl.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--output", str(run), "--no-progress", "train.max_steps=2",
               "train.val_every=1", "--objectives", "empathy,fluency"])
    assert rc == 0
    assert (run / "config.yaml").exists() and (run / "logs" / "train.log").exists()
    for name in ("empathy", "fluency"):
        meta = json.loads((run / "adapters" / name / "emorl.json").read_text())
        assert meta["steps"] == 2 and len(meta["curve"]) == 3
        assert 0.0 <= meta["curve"][-1]["value"] <= 1.0
    assert not (run / "adapters" / "reflection").exists()
    # bad override: a clear error, exit code 2, before any model is loaded
    assert main(["train", "--preset", "tiny", "--output", str(run), "train.bogus=1"]) == 2
    assert main(["train", "--run", str(tmp_path / "nope")]) == 2


def test_full_finetune_baseline_keeps_the_base_frozen(tmp_path, tiny_base):
    fp = tiny_base.fingerprint
    cfg = _cfg("train.strategy=uniform", "lora.full_finetune=true", "train.max_steps=2", "train.kl_coef=0.1",
               "train.lr=1e-2")
    info = _trainer(tmp_path, cfg, base=tiny_base).train()["uniform"]
    out = tmp_path / "baselines" / "uniform"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists() and info.steps == 2
    from emorl.models import fingerprint, is_full_model_dir

    assert is_full_model_dir(out)
    assert fingerprint(tiny_base.model) == fp  # the rewards' and the KL's reference did not move
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(out))
    assert fingerprint(trained) != fp


def test_kl_penalty_runs_and_is_logged(tmp_path):
    cfg = _cfg("train.objectives=[short]", "train.max_steps=2", "train.kl_coef=0.05")
    _trainer(tmp_path, cfg).train()
    recs = [json.loads(x) for x in (tmp_path / "logs" / "single-short.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in recs if "kl" in r]
    # step 1: the adapter is still zero (LoRA B = 0), so policy == reference exactly; step 2: one update later the
    # policy differs from the base, which the reference (the adapter disabled) must still be
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-7) and kls[1] > 1e-6, kls


def test_ctrl_c_writes_a_checkpoint_and_resume_completes(tmp_path):
    """A real SIGINT to `emorl train`: the step finishes, a checkpoint is written, exit code 130; --resume ends it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "emorl.cli", "train", "--preset", "tiny", "--output", str(run), "--no-progress",
            "--objectives", "empathy", "train.checkpoint_every=1000", "train.val_every=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*args, "train.max_steps=1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = run / "logs" / "single-empathy.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any('"loss"' in line for line in log.read_text().splitlines()):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 130, out[-2000:]
    state = json.loads((run / "checkpoints" / "single-empathy" / "state.json").read_text())
    steps = state["trainer"]["policies"]["empathy"]["step"]
    assert steps >= 1
    done = subprocess.run([*args, f"train.max_steps={steps + 1}", "--resume"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((run / "adapters" / "empathy" / "emorl.json").read_text())["steps"] == steps + 1


def test_sampled_validation_uses_common_random_numbers(tmp_path):
    """lr=0: the policy never changes, so a sampled validation with the same random numbers gives a flat curve,
    and validating does not disturb the training RNG stream."""
    cfg = _cfg("train.objectives=[capitals]", "train.lr=0.0", "train.val_every=1", "train.val_samples=2",
               "train.max_steps=3")
    info = _trainer(tmp_path / "a", cfg).train()["capitals"]
    values = [c["value"] for c in info.curve]
    assert len(values) == 4 and len(set(values)) == 1, values
    rare = _cfg("train.objectives=[capitals]", "train.lr=0.0", "train.val_every=100", "train.max_steps=3")
    _trainer(tmp_path / "b", rare).train()
    logs = [[json.loads(x)["reward/mean"] for x in (tmp_path / d / "logs" / "single-capitals.jsonl").read_text()
             .splitlines() if "reward/mean" in x] for d in ("a", "b")]
    assert logs[0] == logs[1]  # same rollouts whether or not validations ran in between


def test_joint_update_trains_the_same_adapters(tmp_path):
    common = ["lora.dropout=0.0", "train.max_steps=2", "train.lr=1e-2"]
    a = _trainer(tmp_path / "a", _cfg(*common)).train()
    b = _trainer(tmp_path / "b", _cfg(*common, "train.joint_update=true")).train()
    assert set(a) == set(b) == {"capitals", "short"}
    for name in a:
        wa, wb = _weights(tmp_path / "a" / "adapters" / name), _weights(tmp_path / "b" / "adapters" / name)
        for k in wa:
            # the same rollouts and ~1e-7-close gradients; Adam's g/sqrt(v) turns the rounding of a near-zero gradient
            # (|g| ~ eps) into up to a few 1e-5 of a step (lr 1e-2) on rare elements
            torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_joint_update_applies_lora_dropout(tmp_path):
    """With dropout on, the bank drops LoRA inputs in training mode: two updates of the same batch differ."""
    from emorl.lora_bank import lora_bank
    from emorl.models import add_adapters

    base = load_base(ModelConfig(name="tiny-llama"))
    from emorl.config import LoraConfig

    m = add_adapters(base, ["xa", "xb"], LoraConfig(r=4, alpha=8, dropout=0.5))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    x = torch.randint(0, 1000, (4, 6))
    outs = []
    for train in (True, True, False, False):
        m.train(train)
        with torch.no_grad(), lora_bank(m, ["xa", "xb"]):
            outs.append(m(input_ids=x).logits)
    assert not torch.allclose(outs[0], outs[1])  # dropout masks differ
    torch.testing.assert_close(outs[2], outs[3])  # eval: deterministic


def _curve(folder):
    return [{k: v for k, v in c.items() if k != "time"} for c in read_adapter_info(folder).curve]


def test_each_adapter_trains_the_same_alone_or_with_others(tmp_path):
    """Training [reflection, empathy, fluency] together gives each adapter bit-identical weights and the same curve
    as training it alone (fresh process state each time; LoRA dropout on, so the update's RNG is covered too)."""
    objs = ["reflection", "empathy", "fluency"]
    common = ["train.max_steps=3", "train.val_every=2", "train.checkpoint_every=100", "lora.dropout=0.1",
              "train.val_samples=2"]
    Trainer(load_config("tiny", common), tmp_path / "all", progress=False).train()
    for o in objs:
        Trainer(load_config("tiny", [*common, f"train.objectives=[{o}]"]), tmp_path / o, progress=False,
                val_objectives=objs).train()
        joint, alone = tmp_path / "all" / "adapters" / o, tmp_path / o / "adapters" / o
        wj, wa = _weights(joint), _weights(alone)
        assert wj.keys() == wa.keys()
        assert all(torch.equal(wj[k], wa[k]) for k in wj), o
        assert _curve(joint) == _curve(alone)
        assert read_adapter_info(joint).prompts_consumed == read_adapter_info(alone).prompts_consumed


def test_adapter_init_depends_only_on_seed_and_name():
    from emorl.config import LoraConfig
    from emorl.models import add_adapters

    lc = LoraConfig(r=4, alpha=8, dropout=0.0)
    a = add_adapters(load_base(ModelConfig(name="tiny-llama")), ["x", "y"], lc, seed=3)
    b = add_adapters(load_base(ModelConfig(name="tiny-llama")), ["z", "y"], lc, seed=3)
    c = add_adapters(load_base(ModelConfig(name="tiny-llama")), ["y"], lc, seed=4)
    pa, pb, pc = ({n: t for n, t in m.named_parameters() if ".y." in n and "lora_A" in n} for m in (a, b, c))
    assert pa and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not any(torch.equal(pa[n], pc[n]) for n in pa)


def test_uniform_sampler_is_per_row_and_reproducible():
    from emorl.sampling import UniformSampler, stable_seed, uniforms

    assert stable_seed(0, "empathy", 3, "train") == stable_seed(0, "empathy", 3, "train") != stable_seed(0, "a", 3)
    u = uniforms(stable_seed(1, "x"), 6, 5)
    assert torch.equal(u, uniforms(stable_seed(1, "x"), 6, 5)) and not torch.equal(u, uniforms(2, 6, 5))
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g) * 3
    ids = torch.zeros(6, 4, dtype=torch.long)
    out = UniformSampler(u, temperature=0.7, top_k=10, top_p=0.9)(ids, scores)
    tok = out.argmax(-1)
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == 6 * 49
    assert all(t in scores[i].topk(10).indices for i, t in enumerate(tok.tolist()))
    for i in range(6):  # a row's token depends on its own scores and uniforms only
        alone = UniformSampler(u[i:i + 1], temperature=0.7, top_k=10, top_p=0.9)(ids[i:i + 1], scores[i:i + 1])
        assert int(alone.argmax(-1)) == int(tok[i])
    # the step index follows the generated length: the second call uses u[:, 1]
    s = UniformSampler(u)
    s(ids, scores)
    second = s(torch.zeros(6, 5, dtype=torch.long), scores).argmax(-1)
    assert torch.equal(second, UniformSampler(u[:, 1:])(ids, scores).argmax(-1))


def test_rollouts_of_an_adapter_do_not_depend_on_the_others(tiny_base):
    """The same adapter sampled in a batch with two others, or alone, gives identical rollout tensors and texts."""
    from emorl.config import GenerationConfig, LoraConfig
    from emorl.models import add_adapters
    from emorl.train.rollout import prompt_width, sample_rollouts

    m = add_adapters(tiny_base, ["xa", "xb", "xc"], LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, top_k=20)
    s = {n: [r.prompt for r in RECORDS[i * 2:(i + 1) * 2]] for i, n in enumerate(["xa", "xb", "xc"])}
    s["xa"] = ["Hi.", "A much longer statement than the others, so that this group's prompts are the widest ones."]
    w = prompt_width(tiny_base, [x for v in s.values() for x in v], 64)
    names = ["xa", "xb", "xc"]
    together = sample_rollouts(m, tiny_base, [(n, s[n]) for n in names], 3, gen, 64, [1, 2, 3], prompt_width=w)
    alone = sample_rollouts(m, tiny_base, [("xb", s["xb"])], 3, gen, 64, [2], prompt_width=w)[0]
    tb = together[1]
    assert tb.texts == alone.texts
    for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(tb.batch, f), getattr(alone.batch, f)), f
    assert together[0].texts != tb.texts


def test_gdpo_advantages_on_a_hand_made_batch():
    from emorl.train.kscst import gdpo_advantages

    # two prompts, k = 3 replies, J = 2 rewards
    r = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 3.0],     # prompt 1
                      [1.0, 5.0], [1.0, 5.0], [1.0, 5.0]])    # prompt 2: every reply equal
    adv = gdpo_advantages(r, 3, eps=0.0 + 1e-12)
    # prompt 1, reward 1: mean 1, unbiased std sqrt((1+1+4)/2) = sqrt(3) -> (-1, -1, 2)/sqrt(3)
    #           reward 2: mean 2, std 1 -> (-1, 0, 1); summed:
    # prompt 2: no spread, no signal (eps keeps it finite): 0; then the six sums are z-scored over the batch
    s3 = 3 ** 0.5
    summed = np.array([-1 / s3 - 1, -1 / s3, 2 / s3 + 1, 0.0, 0.0, 0.0])
    assert adv.tolist() == pytest.approx(((summed - summed.mean()) / summed.std(ddof=1)).tolist(), abs=1e-6)
    # scale-free per reward: multiplying one reward by 100 changes nothing, unlike k-SCST on the sum
    r2 = r.clone()
    r2[:, 1] *= 100
    assert gdpo_advantages(r2, 3).tolist() == pytest.approx(gdpo_advantages(r, 3).tolist(), abs=1e-3)
    a = 1 / (2 ** 0.5 + 1e-4)  # the summed z-scores ±a, then over the batch: ±a / (unbiased std a·√2 + 1e-4)
    assert gdpo_advantages(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), 2).tolist() == pytest.approx(
        [-a / (a * 2 ** 0.5 + 1e-4), a / (a * 2 ** 0.5 + 1e-4)])


def test_gdpo_trainer_uses_per_reward_advantages(tmp_path):
    from emorl.train.strategies import GDPOWeighting

    t = _trainer(tmp_path, _cfg("train.strategy=gdpo", "train.max_steps=1"))
    t.setup()
    p = t.policies[0]
    assert isinstance(p.weighting, GDPOWeighting) and p.weighting.weights().tolist() == [0.5, 0.5]
    from types import SimpleNamespace

    texts = ["P", "abc", "X", "bb and cc"]  # 2 prompts x k = 2; the first reply of each is better in both
    ro = SimpleNamespace(texts=texts, prompts_per_reply=["p", "p", "q", "q"], batch=SimpleNamespace(k=2))
    scores, lam, rewards, adv = t._advantages(p, ro)
    logs = np.log(np.clip(scores, 1e-4, 0.9999))
    want = []
    for g in (logs[:2], logs[2:]):  # per prompt, per reward: (r - mean) / (unbiased std + 1e-4), summed
        z = (g - g.mean(0)) / (g.std(0, ddof=1) + 1e-4)
        want += z.sum(1).tolist()
    want = (np.array(want) - np.mean(want)) / (np.std(want, ddof=1) + 1e-4)  # then over the batch
    assert adv.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    # k = 2: each reward ±1/√2, summed ±√2; over the batch (unbiased std √(8/3)): ±√(3)/2
    assert adv.tolist() == pytest.approx([3 ** 0.5 / 2, -(3 ** 0.5) / 2] * 2, rel=1e-3)


def test_baselines_train_the_same_together_or_alone(tmp_path):
    """uniform, dynaopt and gdpo trained in one Trainer (one batched rollout per step) give each policy bit-identical
    weights, curve and DynaOpt weight log as training it alone; DynaOpt keeps its own round length."""
    common = ["train.max_steps=3", "train.val_every=3", "train.dynaopt_val_every=1", "train.checkpoint_every=100",
              "lora.dropout=0.1"]
    cfg = load_config("tiny", common)
    Trainer(cfg, tmp_path / "all", progress=False, strategies=["uniform", "dynaopt", "gdpo"]).train()
    for s in ("uniform", "dynaopt", "gdpo"):
        Trainer(load_config("tiny", [*common, f"train.strategy={s}"]), tmp_path / s, progress=False).train()
        joint, alone = tmp_path / "all" / "baselines" / s, tmp_path / s / "baselines" / s
        wj, wa = _weights(joint), _weights(alone)
        assert wj.keys() == wa.keys() and all(torch.equal(wj[k], wa[k]) for k in wj), s
        ij, ia = read_adapter_info(joint), read_adapter_info(alone)
        assert _curve(joint) == _curve(alone)
        assert ij.strategy == s and ij.extra["train"]["strategy"] == s
        assert ij.extra["weights_log"] == ia.extra["weights_log"]
        steps = [c["step"] for c in ij.curve]
        assert steps == ([0, 1, 2, 3] if s == "dynaopt" else [0, 3])  # val_every=3; DynaOpt's rounds: 1 step
    with pytest.raises(EmorlError, match="apart from the baselines"):
        Trainer(cfg, tmp_path / "x", progress=False, strategies=["single", "uniform"])

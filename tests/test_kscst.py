"""The k-SCST pieces against plainly written references."""

import json

import numpy as np
import pytest
import torch

from emorl.config import LoraConfig
from emorl.data import encode_prompts, format_prompts
from emorl.models import add_adapters
from emorl.train.kscst import (
    RolloutBatch,
    Warp,
    _gather_logprobs,
    causal_token_logprobs,
    completion_mask,
    gdpo_advantages,
    group_advantages,
    kscst_loss,
    policy_gradient_step,
    sampling_warp,
    seq2seq_token_logprobs,
    transform_rewards,
)
from emorl.train.strategies import DynaOptWeighting, Exp3, FixedWeighting, make_weighting


def test_transform_rewards_log_clip_and_weights():
    s = np.array([[0.0, 0.5], [1.0, 0.25]])
    r = transform_rewards(s, np.array([0.5, 0.5]))
    expected = 0.5 * np.log(np.clip(s, 1e-4, 0.9999)).sum(1)
    np.testing.assert_allclose(r, expected)
    np.testing.assert_allclose(transform_rewards(s, np.array([1.0, 0.0]), "identity"), [0.0, 1.0])


def test_advantages_sum_to_zero_per_prompt_group():
    r = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 5.0])
    a = group_advantages(r, 3)
    torch.testing.assert_close(a.view(2, 3).sum(1), torch.zeros(2))
    torch.testing.assert_close(a, torch.tensor([-2.0, -1.0, 3.0, -2.0, -2.0, 4.0]))


def test_completion_mask_stops_after_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    m = completion_mask(ids, [eos])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def _adapted(base, std=0.2):
    m = add_adapters(base, ["obj"], LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * std
    m.eval()
    return m


def _rollout(base, model, statements, k=3, new=6):
    texts = format_prompts(base.tokenizer, statements, base.is_seq2seq)
    enc = encode_prompts(base.tokenizer, texts, 64, base.is_seq2seq)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=new, num_return_sequences=k,
                             pad_token_id=base.tokenizer.pad_token_id)
    comp = out[:, 1:] if base.is_seq2seq else out[:, enc["input_ids"].shape[1]:]
    return RolloutBatch(enc["input_ids"], enc["attention_mask"], comp,
                        completion_mask(comp, [base.tokenizer.eos_token_id]), k)


def test_causal_logprobs_match_full_log_softmax(tiny_base):
    """Shared-prompt log-probs (prompt once, cache repeated k times) == a plain full forward + log_softmax."""
    m = _adapted(tiny_base)
    batch = _rollout(tiny_base, m, ["I feel sad.", "My cat ran away last night and I miss her so much."])
    eos = tiny_base.tokenizer.eos_token_id
    batch.completion_ids[0, 2] = eos  # rows that end mid-reply: the masked tail must not leak into the kept tokens
    batch.completion_ids[4, 0] = eos
    batch.completion_mask = completion_mask(batch.completion_ids, [eos])
    keep = batch.completion_mask.bool()
    assert not keep[0, 3:].any() and keep[0, :3].all() and keep[4].tolist() == [True] + [False] * 5
    fast = causal_token_logprobs(m, batch, share_prompt=True)
    k = batch.k
    P = batch.prompt_ids.shape[1]
    ref = torch.zeros_like(fast)
    for row in range(fast.shape[0]):  # one plain forward per reply, cut after its EOS: nothing to mask
        n = int(keep[row].sum())
        pm = batch.prompt_mask[row // k]
        ids = torch.cat([batch.prompt_ids[row // k], batch.completion_ids[row, :n]])[None]
        mask = torch.cat([pm, torch.ones(n, dtype=pm.dtype)])[None]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
        ref[row, :n] = logp[0, P - 1:-1].gather(-1, batch.completion_ids[row, :n, None]).squeeze(-1)
    torch.testing.assert_close(fast[keep], ref[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_token_logprobs(m, batch, share_prompt=False)[keep], ref[keep], atol=1e-5,
                               rtol=1e-5)


def test_shared_prompt_gradient_equals_full_forward_gradient(tiny_base):
    m = _adapted(tiny_base)
    batch = _rollout(tiny_base, m, ["I feel sad.", "Work is awful lately."])
    grads = []
    for share in (True, False):
        m.zero_grad()
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        causal_token_logprobs(m, batch, share_prompt=share).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_seq2seq_logprobs_match_labels_forward(tiny_t5_base):
    m = _adapted(tiny_t5_base)
    batch = _rollout(tiny_t5_base, m, ["I feel sad.", "Nobody calls me anymore."], k=2)
    fast = seq2seq_token_logprobs(m, batch, tiny_t5_base.model.config.decoder_start_token_id)
    k = batch.k
    out = m(input_ids=batch.prompt_ids.repeat_interleave(k, 0),
            attention_mask=batch.prompt_mask.repeat_interleave(k, 0), labels=batch.completion_ids.contiguous())
    ref = out.logits.log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_loss_is_reinforce_with_mean_baseline():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([0.5, -0.5])
    loss, _ = kscst_loss(logp, mask, adv, n_total=2)
    assert float(loss) == pytest.approx(-(0.5 * -3.0 + -0.5 * -10.0) / 2)
    loss.backward()
    # gradient only on unmasked tokens, = -adv / N
    assert logp.grad.tolist() == [[-0.25, -0.25, 0.0], [0.25, 0.25, 0.25]]


def test_kl_term_k3_is_zero_at_reference_and_pinned_elsewhere():
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, st = kscst_loss(logp, mask, torch.zeros(1), 1, ref_logp=logp.detach().clone(), kl_coef=0.1)
    assert st["kl"] == pytest.approx(0.0)
    ref = torch.tensor([[-1.5, -1.0, -5.0]], requires_grad=True)
    loss, st = kscst_loss(logp, mask, torch.zeros(1), 1, ref_logp=ref, kl_coef=0.1)
    # Δ = ref − logp = (−0.5, 1.0; masked); k3 = (e^−0.5 + 0.5 − 1) + (e − 1 − 1) = 0.1065307 + 0.7182818
    assert st["kl"] == pytest.approx(0.8248125, abs=1e-6)
    assert float(loss) == pytest.approx(0.1 * 0.8248125, abs=1e-6)
    loss.backward()
    # gradient of KL(π‖π_ref): 0.1 · Σ_{s≥t} (logp − ref)_s = 0.1 · (0.5 − 1.0, −1.0) = (−0.05, −0.1), 0 masked
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.05, -0.1, 0.0]]), atol=1e-6, rtol=0)
    assert ref.grad is None  # the reference is detached


def test_micro_batching_gives_the_same_gradient(tiny_base):
    m = _adapted(tiny_base)
    batch = _rollout(tiny_base, m, ["I feel sad.", "Work is awful.", "I failed my exam.", "I'm lonely."], k=2)
    adv = group_advantages(torch.tensor([0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.8, 0.1]), 2)
    grads = []
    for rows in (8, 2):
        m.zero_grad()
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        policy_gradient_step(m, batch, adv, is_seq2seq=False, micro_batch_rows=rows)
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- strategies

def test_fixed_and_uniform_weights():
    assert make_weighting("uniform", ["a", "b", "c"]).weights().tolist() == pytest.approx([1 / 3] * 3)
    assert make_weighting("single", ["a"]).weights().tolist() == [1.0]
    with pytest.raises(ValueError):
        FixedWeighting(["a", "b"], [1.0, -1.0])


def test_exp3_probabilities_and_update():
    b = Exp3(4, gamma=0.07)
    np.testing.assert_allclose(b.probs(), 0.25)
    b.update(2, 1.0)
    p = b.probs()
    # w_2 = exp(0.07 * (1 / 0.25) / 4) = exp(0.07)
    w = np.array([1, 1, np.exp(0.07), 1])
    np.testing.assert_allclose(p, 0.93 * w / w.sum() + 0.07 / 4)


class _CountUpdates:
    """Wraps a bandit's update to record each call."""

    def __init__(self, bandit):
        self.calls = []
        self._update = bandit.update
        bandit.update = self

    def __call__(self, arm, reward):
        self.calls.append((arm, reward))
        self._update(arm, reward)


def test_dynaopt_one_weight_update_per_round_none_before_the_first_step():
    d = DynaOptWeighting(["a", "b"], gamma=0.07, seed=3)
    d.arm_bandit.draw = lambda rng: 0  # always up-weight objective a, so every round's update is visible
    ups = _CountUpdates(d.weight_bandit)
    np.testing.assert_allclose(d.weights(), [0.5, 0.5])
    d.on_validation({"a": 0.2, "b": 0.2})  # the step-0 validation: history only, no weight update
    np.testing.assert_allclose(d.weights(), [0.5, 0.5])
    for _ in range(3):
        d.before_step()
    assert ups.calls == []  # the first round runs on uniform weights
    d.on_validation({"a": 0.4, "b": 0.2})  # closes round 1 (no arm to credit), draws nothing yet
    assert ups.calls == [] and d.log[-1]["arm"] is None
    per_round = []
    for r in range(4):
        for _ in range(3):
            d.before_step()
        per_round.append(len(ups.calls))
        d.on_validation({"a": 0.4 + 0.1 * r, "b": 0.2})
        assert d.log[-1]["arm"] == 0
    assert per_round == [1, 2, 3, 4]  # exactly one weight update per round, at the round's first step
    d.on_validation({"a": 0.9, "b": 0.2})  # a validation with no step since (the end of training): no new round
    d.on_validation({"a": 0.9, "b": 0.2})
    assert len(ups.calls) == 4 and d.log[-1]["arm"] is None
    # w_a = exp(4 · 0.07 · (1 / p_a) / 2), p_a recomputed after each update
    log_w = 0.0
    for _ in range(4):
        w = np.exp([log_w, 0.0])
        p_a = 0.93 * w[0] / w.sum() + 0.07 / 2
        log_w += 0.07 / p_a / 2
    np.testing.assert_allclose(d.weight_bandit.log_w, [log_w, 0.0])


def test_dynaopt_reward_is_mapped_into_unit_interval_and_improvement_raises_the_arm():
    f = DynaOptWeighting.unit_reward
    assert (f(0.0), f(0.2), f(-0.4), f(3.0), f(-7.0)) == (0.5, 0.6, pytest.approx(0.3), 1.0, 0.0)
    d = DynaOptWeighting(["a", "b"], gamma=0.07, seed=0)
    d.arm_bandit.draw = lambda rng: 1
    rewards = _CountUpdates(d.arm_bandit)
    d.on_validation({"a": 0.2, "b": 0.2})
    d.before_step()
    d.on_validation({"a": 0.2, "b": 0.2})
    d.before_step()
    p_before = d.arm_bandit.probs()
    d.on_validation({"a": 0.5, "b": 0.3})  # improvement over the history mean (0.2, 0.2): (0.3 + 0.1) / 2 = 0.2
    assert rewards.calls == [(1, pytest.approx(0.6))]
    assert d.log[-1]["improvement"] == pytest.approx(0.2) and d.log[-1]["reward"] == pytest.approx(0.6)
    p_after = d.arm_bandit.probs()
    assert p_after[1] > p_before[1] and np.all(p_after[[0, 2]] < p_before[[0, 2]])


def test_dynaopt_state_roundtrips_mid_round():
    d = DynaOptWeighting(["a", "b"], gamma=0.5, seed=3)
    for r in range(5):
        d.on_validation({"a": 0.1 * r, "b": 0.2})
        d.before_step()
    d.on_validation({"a": 0.7, "b": 0.1})
    e = DynaOptWeighting(["a", "b"], gamma=0.5, seed=99)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    np.testing.assert_allclose(e.weights(), d.weights())
    for w in (d, e):
        w.before_step()
    np.testing.assert_allclose(e.weights(), d.weights())
    assert e.arm == d.arm and e.log == d.log and e.rng.random() == d.rng.random()


def test_joint_update_gives_each_adapter_its_own_gradient(tiny_base):
    """One forward/backward over two adapters' rows (LoRA bank) == two separate policy-gradient steps."""
    from emorl.train.kscst import joint_policy_gradient_step

    m = add_adapters(tiny_base, ["xa", "xb"], LoraConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    m.set_adapter("xa")
    ba = _rollout(tiny_base, m, ["I feel sad.", "Work is hard."], k=2)
    m.set_adapter("xb")
    bb = _rollout(tiny_base, m, ["My mom is ill and I am scared of losing her.", "No."], k=2)
    aa = group_advantages(torch.tensor([0.1, 0.5, 0.3, 0.2]), 2)
    ab = group_advantages(torch.tensor([0.9, 0.5, 0.1, 0.2]), 2)

    def lora_grads():
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    m.zero_grad()
    for name, batch, adv in (("xa", ba, aa), ("xb", bb, ab)):
        m.set_adapter(name)
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        policy_gradient_step(m, batch, adv, is_seq2seq=False, micro_batch_rows=4)
    separate = lora_grads()
    m.zero_grad()
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    joint_policy_gradient_step(m, [ba, bb], [aa, ab], ["xa", "xb"], micro_batch_rows=4)
    joint = lora_grads()
    assert separate.keys() == joint.keys() and any(".xb." in k for k in joint)
    for k in separate:
        torch.testing.assert_close(joint[k], separate[k], atol=1e-6, rtol=1e-5)


def test_gdpo_equals_the_three_published_steps():
    """GDPO (Liu et al., 2026) on a hand-made batch of 2 prompts × k=3 replies × 2 rewards, step by step in numpy:
    (1) z-score each reward within its prompt's k (unbiased std), (2) sum over rewards, (3) z-score over the batch."""
    r = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0],  # prompt A
                  [5.0, 1.0], [5.0, 2.0], [8.0, 3.0]])  # prompt B
    eps = 1e-4
    step1 = np.empty_like(r)
    for g in (slice(0, 3), slice(3, 6)):
        step1[g] = (r[g] - r[g].mean(0)) / (r[g].std(0, ddof=1) + eps)
    step2 = step1.sum(1)
    step3 = (step2 - step2.mean()) / (step2.std(ddof=1) + eps)
    # by hand: prompt A reward 1 -> (-1, 0, 1), reward 2 -> (-1/√3, -1/√3, 2/√3) (std √3), ...
    np.testing.assert_allclose(step1[:3, 0], [-1, 0, 1], atol=1e-3)
    np.testing.assert_allclose(step1[:3, 1], np.array([-1, -1, 2]) / np.sqrt(3), atol=1e-3)
    out = gdpo_advantages(torch.tensor(r, dtype=torch.float64), k=3, eps=eps)
    np.testing.assert_allclose(out.numpy(), step3, rtol=1e-9, atol=1e-12)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-3)  # one scale whatever the number of rewards


def test_loss_scores_the_temperature_and_top_k_warped_distribution(tiny_base):
    """The rollouts sample from softmax(logits / T) restricted to top-k: the loss's log-probs are those of that
    distribution (T = 0.5, top-k 5), not of the raw policy, and the loss is −mean A · Σ_t log π_warped."""
    m = _adapted(tiny_base)
    texts = format_prompts(tiny_base.tokenizer, ["I feel sad.", "Work is awful today."], False)
    enc = encode_prompts(tiny_base.tokenizer, texts, 64, False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = m.generate(**enc, do_sample=True, temperature=0.5, top_k=5, max_new_tokens=5, num_return_sequences=2,
                         pad_token_id=tiny_base.tokenizer.pad_token_id)
    comp = out[:, enc["input_ids"].shape[1]:]
    batch = RolloutBatch(enc["input_ids"], enc["attention_mask"], comp,
                         completion_mask(comp, [tiny_base.tokenizer.eos_token_id]), 2)
    ids = torch.cat([enc["input_ids"].repeat_interleave(2, 0), comp], 1)
    mask = torch.cat([enc["attention_mask"].repeat_interleave(2, 0), torch.ones_like(comp)], 1)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        logits = logits[:, enc["input_ids"].shape[1] - 1:-1].float() / 0.5
        kth = logits.topk(5, dim=-1).values[..., -1:]
        want = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
        want = want.gather(-1, comp[..., None])[..., 0]
        got = causal_token_logprobs(m, batch, warp=Warp(0.5, top_k=5))
        raw = causal_token_logprobs(m, batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - raw).abs().max() > 0.1  # the raw policy is a different distribution
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    stats = policy_gradient_step(m, batch, adv, is_seq2seq=False, micro_batch_rows=4, warp=Warp(0.5, top_k=5))
    cm = batch.completion_mask
    assert stats["loss"] == pytest.approx(float(-(adv * (want * cm).sum(1)).sum() / 4), rel=1e-4, abs=1e-5)


def test_warp_keeps_the_sampled_token_in_the_support():
    """A sampled id that the update's forward ranks outside top-k (dropout) keeps a finite log-prob."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lp = _gather_logprobs(logits, torch.tensor([3]), Warp(1.0, top_k=2))
    assert torch.isfinite(lp).all()
    want = torch.log_softmax(torch.tensor([3.0, 2.0, 0.0]), -1)[2]  # support = top-2 plus the sampled id
    assert float(lp) == pytest.approx(float(want), abs=1e-6)
    assert sampling_warp(1.0, 0, 1.0) is None and sampling_warp(0.5, 50, 1.0) == Warp(0.5, 50, 1.0)


def test_kl_gradient_is_that_of_exact_kl_policy_to_reference():
    """Two-token replies over a 3-token vocabulary: the expected value and gradient of the KL term (over all 9
    replies, weighted by π) equal the exact KL(π‖π_ref) and its autograd gradient (not KL(π_ref‖π)'s)."""
    g = torch.Generator().manual_seed(0)
    th1 = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)  # π(y1)
    th2 = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)  # π(y2 | y1)
    r1, r2 = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    lp1, lp2 = torch.log_softmax(th1, -1), torch.log_softmax(th2, -1)
    q1, q2 = torch.log_softmax(r1, -1), torch.log_softmax(r2, -1)
    p1, p2 = lp1.exp(), lp2.exp()
    exact = (p1 * (lp1 - q1)).sum() + (p1 * (p2 * (lp2 - q2)).sum(1)).sum()
    want = torch.autograd.grad(exact, [th1, th2], retain_graph=True)
    expected, value = torch.zeros((), dtype=torch.float64), 0.0
    for a in range(3):
        for b in range(3):
            logp = torch.stack([lp1[a], lp2[a, b]])[None]
            ref = torch.stack([q1[a], q2[a, b]])[None]
            loss, st = kscst_loss(logp, torch.ones(1, 2), torch.zeros(1), 1, ref_logp=ref, kl_coef=1.0)
            weight = float(p1[a] * p2[a, b])
            expected = expected + weight * loss
            value += weight * st["kl"]
    got = torch.autograd.grad(expected, [th1, th2])
    assert value == pytest.approx(float(exact), rel=1e-9)
    for gw, gg in zip(want, got, strict=True):
        torch.testing.assert_close(gg, gw, atol=1e-10, rtol=1e-8)

"""The Hi-GRPO loss against hand computations (pure tensors and a tiny linear policy)."""
import math

import pytest
import torch

from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.loss import policy_loss, token_weights

torch.manual_seed(0)
B, T, V, D = 4, 6, 7, 5
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
LEVELS = torch.tensor([0, 0, 1, 1])  # two coarse, two fine sequences
ADV = torch.tensor([1.0, -0.5, 2.0, -1.0])


def tiny_policy_logp(W, x, tokens):
    """A tiny 'model': logits = x @ W, log-probs of the given tokens."""
    return torch.log_softmax(x @ W, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.fixture
def tiny():
    W = torch.randn(D, V, requires_grad=True)
    x = torch.randn(B, T, D)
    tokens = torch.randint(0, V, (B, T))
    return W, x, tokens


def test_beta0_ratio1_loss_is_token_weighted_negative_mean_advantage(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    loss, parts = policy_loss(logp, logp.detach(), logp.detach(), ADV, w, RLConfig(beta=0.0))
    n0, n1 = MASK[:2].sum(), MASK[2:].sum()  # tokens of each level
    expected = -(ADV[0] * 4 + ADV[1] * 6) / n0 - (ADV[2] * 2 + ADV[3] * 3) / n1
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)
    assert parts["ratio_mean"] == pytest.approx(1.0) and "kl" not in parts  # no reference: no KL measured


@pytest.mark.parametrize("agg", ["token", "sequence", "dr-grpo"])
def test_gradients_of_each_aggregation_match_hand_computation(tiny, agg):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, agg)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), ADV, w, RLConfig(beta=0.0, loss_agg=agg))
    (g,) = torch.autograd.grad(loss, W)
    # by hand: at ratio 1, dL/dlogp_it = -A_i * c_it with c from the aggregation's definition
    c = torch.zeros(B, T)
    for lv in (0, 1):
        rows = [i for i in range(B) if LEVELS[i] == lv]
        lens = {i: int(MASK[i].sum()) for i in rows}
        for i in rows:
            for t in range(lens[i]):
                c[i, t] = {"token": 1 / sum(lens.values()),
                           "sequence": 1 / (lens[i] * len(rows)),
                           "dr-grpo": 1 / (len(rows) * max(lens.values()))}[agg]
    (g_hand,) = torch.autograd.grad((-(ADV[:, None] * c) * tiny_policy_logp(W, x, tokens)).sum(), W)
    assert torch.allclose(g, g_hand, atol=1e-6)


def test_sequence_ratio_gspo_gradient(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), ADV, w, RLConfig(beta=0.0, ratio="sequence"))
    (g,) = torch.autograd.grad(loss, W)
    n = MASK.sum(1).float()
    coef = -(ADV * w.sum(1) / n)[:, None] * MASK  # d/dlogp_it of -A_i W_i exp(mean_t log r_it)
    (g_hand,) = torch.autograd.grad((coef * tiny_policy_logp(W, x, tokens)).sum(), W)
    assert torch.allclose(g, g_hand, atol=1e-6)


def test_clipping_engages_when_the_policy_moved(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    adv = torch.ones(B)
    old = logp.detach() - 0.5  # ratio e^0.5 = 1.65 > 1 + 0.28: every token clipped (positive advantage)
    loss, parts = policy_loss(logp, old, logp.detach(), adv, w, RLConfig(beta=0.0))
    assert parts["clip_high_frac"] == pytest.approx(1.0) and parts["clip_low_frac"] == 0.0
    (g,) = torch.autograd.grad(loss, W)
    assert torch.count_nonzero(g) == 0  # clipped tokens carry no gradient
    assert float(loss.detach()) == pytest.approx(-1.28 * 2, rel=1e-5)  # (1 + eps_high) * A summed over 2 levels
    old = logp.detach() + 0.5  # ratio e^-0.5 < 0.8 with negative advantage: clipped low
    _, parts = policy_loss(logp, old, logp.detach(), -adv, w, RLConfig(beta=0.0))
    assert parts["clip_low_frac"] == pytest.approx(1.0)


def test_kl_is_zero_against_itself_and_positive_otherwise(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    _, parts = policy_loss(logp, logp.detach(), logp.detach(), ADV, w, RLConfig(beta=0.01))
    assert parts["kl"] == 0.0
    ref = logp.detach() + 0.3
    loss, parts = policy_loss(logp, logp.detach(), ref, torch.zeros(B), w, RLConfig(beta=0.01))
    k3 = math.exp(0.3) - 0.3 - 1
    assert parts["kl"] == pytest.approx(k3, rel=1e-5)
    assert float(loss) == pytest.approx(0.01 * k3 * 2, rel=1e-5)  # beta * KL, per level, summed


def test_extreme_log_prob_gaps_stay_finite(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    old = logp.detach() - 200.0  # a stale token: ratio would overflow exp() without the bound
    ref = logp.detach() + 200.0  # a reference far away: k3 would overflow without the bound
    loss, parts = policy_loss(logp, old, ref, ADV, w, RLConfig(beta=0.01))
    (g,) = torch.autograd.grad(loss, W)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and math.isfinite(parts["kl"])


def test_per_token_kl_is_capped_and_uncapped_on_request(tiny):
    W, x, tokens = tiny
    logp = tiny_policy_logp(W, x, tokens)
    w = token_weights(MASK, LEVELS, "token")
    ref = logp.detach() + 5.0  # the policy sits 5 nats below the reference on every token
    k3 = math.exp(5.0) - 5.0 - 1
    _, capped = policy_loss(logp, logp.detach(), ref, torch.zeros(B), w, RLConfig(beta=0.01, kl_max=10))
    _, raw = policy_loss(logp, logp.detach(), ref, torch.zeros(B), w, RLConfig(beta=0.01))
    assert capped["kl"] == pytest.approx(10.0) and raw["kl"] == pytest.approx(k3, rel=1e-5)
    # beyond the cap the KL term gives no gradient, so the policy-gradient term keeps the update
    loss, _ = policy_loss(logp, logp.detach(), ref, torch.zeros(B), w, RLConfig(beta=0.01, kl_max=10))
    (g,) = torch.autograd.grad(loss, W)
    assert float(g.abs().max()) == 0.0


def test_loss_masks_of_a_minibatch_are_each_rows_loss_mask():
    """minibatch_weights takes every row's mask in one call: the same as each row's kinds taken
    alone (completion_kinds of that row), padded with False; row_masks cuts each to its completion."""
    import random

    from rl3d.stages.policy.sequence import KIND_MESH, KIND_REASONING, completion_kinds
    from rl3d.stages.rl.update import loss_masks, row_masks

    def alone(r):
        plen, n = r["prompt_len"], len(r["input_ids"])
        kinds = completion_kinds(torch.tensor([plen]), torch.tensor([r["reasoning_end"]]), torch.tensor([r["mesh_end"]]),
                                 torch.tensor([n]), torch.tensor([bool(r.get("reasoning_truncated", False))]),
                                 n - plen)[0]
        return (kinds == KIND_REASONING) | (kinds == KIND_MESH)

    rng = random.Random(0)
    rows = []
    for i in range(40):
        plen = rng.randint(2, 9)
        length = plen + rng.randint(1, 30)
        re_end = plen + rng.randint(0, 8)
        rows.append({"input_ids": list(range(length)), "prompt_len": plen, "reasoning_end": re_end,
                     "mesh_end": min(length - 1, re_end + rng.randint(1, 20)), "reasoning_truncated": i % 3 == 0})
    rows[5].pop("reasoning_truncated")  # older tables: the column absent means False
    masks = loss_masks(rows)
    assert masks.shape == (40, max(len(r["input_ids"]) - r["prompt_len"] for r in rows))
    for i, (r, cut) in enumerate(zip(rows, row_masks(rows))):
        one = alone(r)
        assert torch.equal(masks[i, :len(one)], one) and not masks[i, len(one):].any()
        assert torch.equal(cut, one)
    assert row_masks([]) == []

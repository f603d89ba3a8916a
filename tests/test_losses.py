"""The pure loss and advantage functions against their papers' formulas."""

import math

import pytest
import torch

from nanoalign.generate import sequence_logps
from nanoalign.rl import kl_estimates, masked_mean, masked_whiten
from nanoalign.train_dpo import dpo_loss
from nanoalign.train_ppo import adaptive_kl_update, gae, per_token_rewards, ppo_loss
from nanoalign.train_rm import bt_loss
from nanoalign.train_sft import sft_loss

from grading import close

LOG2 = math.log(2)


# ----------------------------------------------------------------------------------- SFT

def test_sft_loss_is_mean_response_token_nll_and_ignores_prompt_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    logp = torch.log_softmax(logits, -1)
    by_hand = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5] + logp[1, 0, 7] + logp[1, 1, 8]) / 5
    close(sft_loss(logits, labels, 5), by_hand, "sft_loss = the summed NLL of the labelled tokens "
          "(logits at t predict the label at t + 1; -100 is skipped) / n_tokens", atol=1e-6)
    # the label of a prompt position is -100 whatever the token was: changing prompt tokens' targets
    # is impossible, and a pad row adds nothing
    padded_logits = torch.cat([logits, torch.randn(2, 3, 11)], 1)
    padded_labels = torch.cat([labels, torch.full((2, 3), -100)], 1)
    close(sft_loss(padded_logits, padded_labels, 5), sft_loss(logits, labels, 5),
          "padding labelled -100 changes nothing", atol=0, rtol=0)


def test_sft_global_token_normalisation_makes_accumulation_equal_one_big_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 8, 13, requires_grad=True)
    labels = torch.randint(0, 13, (4, 8))
    labels[0, :7] = -100  # uneven: row 0 has one response token, the others eight
    labels[1, :2] = -100
    n = (labels[:, 1:] != -100).sum()
    full = sft_loss(logits, labels, n)
    split = sft_loss(logits[:2], labels[:2], n) + sft_loss(logits[2:], labels[2:], n)
    close(split, full, "two micro-batches, each divided by the batch's n_tokens, sum to the loss "
          "of the whole batch (divide by n_tokens, not by the micro-batch's own count)", atol=1e-6)
    per_micro_mean = (sft_loss(logits[:2], labels[:2], (labels[:2, 1:] != -100).sum())
                      + sft_loss(logits[2:], labels[2:], (labels[2:, 1:] != -100).sum())) / 2
    # the negative control: per-micro-batch means differ
    assert not torch.allclose(full, per_micro_mean, atol=1e-3)


# ----------------------------------------------------------------------------------- reward model

def test_bt_loss_is_log2_at_ties_with_gradient_minus_half_and_zero_accuracy():
    r = torch.tensor([0.3, -1.2], requires_grad=True)
    loss, m = bt_loss(r, r.detach().clone())
    close(loss, torch.tensor(LOG2), "bt_loss at a tie = -log sigmoid(0) = log 2", atol=1e-6)
    assert m["accuracy"] == 0.0, f"a tie is not a correct ranking: accuracy {m['accuracy']}, not 0"
    loss.backward()
    # -0.5 per pair, averaged over 2 pairs
    close(r.grad, torch.tensor([-0.25, -0.25]), "dL/dr_chosen at a tie = -1/2 per pair, averaged "
          "over the batch of 2")


def test_bt_loss_is_shift_invariant_and_antisymmetric():
    c, r = torch.tensor([1.0, 0.2, -0.3]), torch.tensor([0.5, 0.9, -1.0])
    close(bt_loss(c + 7, r + 7)[0], bt_loss(c, r)[0],
          "only differences count: bt_loss(c + 7, r + 7) = bt_loss(c, r)")
    delta = c - r
    close(bt_loss(c, r)[0], -torch.nn.functional.logsigmoid(delta).mean(),
          "bt_loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)")
    # L(delta) - L(-delta) = -delta per pair, so -mean(delta) for the batch means
    close(bt_loss(c, r)[0] - bt_loss(r, c)[0], -delta.mean(),
          "swapping chosen and rejected: L(delta) - L(-delta) = -delta", atol=1e-6)
    accuracies = bt_loss(c, r)[1]["accuracy"], bt_loss(r, c)[1]["accuracy"]
    assert sum(accuracies) == pytest.approx(1.0), \
        f"swapping chosen and rejected turns accuracy a into 1 - a; got {accuracies}"


def test_bt_margin_loss_is_log2_when_difference_equals_margin():
    loss = bt_loss(torch.tensor([2.0]), torch.tensor([1.5]), margin=0.5)[0]
    close(loss, torch.tensor(LOG2), "-log sigmoid(r_chosen - r_rejected - margin) with a "
          "difference equal to the margin = log 2", atol=1e-6)


def tiny_reward_model(seed=0):
    from nanoalign.model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=23, block_size=32, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg).add_scalar_head().eval()


def scalar_alone(rm, ids):
    """The scalar head at the last token of one unpadded sequence: the reward it must give."""
    return rm(torch.tensor([ids]), output="scalar")[0, -1]


def test_pair_rewards_read_each_answer_at_its_last_real_token():
    """r(x, y) is the scalar head at y's last real token (its <|end|>): in a ragged right-padded
    batch every answer gets the reward of its own unpadded forward, never a pad's."""
    from nanoalign.rl import pair_rewards
    rm, END = tiny_reward_model(), 22
    pairs = [([1, 2, 3], [4, 5, END], [6, END]), ([7], [8, 9, 10, 11, END], [12, END]),
             ([13, 14], [END], [15, 16, 17, END])]
    chosen, rejected = pair_rewards(rm, pairs, 0, "cpu")
    close(chosen, torch.stack([scalar_alone(rm, p + c) for p, c, _ in pairs]),
          "chosen rewards = scalar head at prompt + chosen's last real token", atol=1e-5)
    close(rejected, torch.stack([scalar_alone(rm, p + r) for p, _, r in pairs]),
          "rejected rewards = scalar head at prompt + rejected's last real token", atol=1e-5)
    shifted, _ = pair_rewards(rm, pairs, 0, "cpu", offset=0.75)
    close(shifted, chosen - 0.75, "the offset is subtracted from every reward", atol=1e-6)


def test_score_last_token_ignores_padding_and_subtracts_the_offset():
    """The RL scorer: the same reading on rollouts, left-padded prompts and right-padded answers
    (an answer that never ended is read at its last token)."""
    from nanoalign.generate import pad_left
    from nanoalign.rl import score_last_token
    rm, END = tiny_reward_model(1), 22
    rows = [[1, 2, 3, 4, END], [5, 6, END], [7, 8, 9]]
    left, left_mask = pad_left([r[:2] for r in rows], 0)
    answers = [r[2:] for r in rows]
    width = max(map(len, answers))
    right = torch.tensor([a + [0] * (width - len(a)) for a in answers])
    tokens = torch.cat([left, right], 1)
    mask = torch.cat([left_mask, right != 0], 1)
    want = torch.stack([scalar_alone(rm, r) for r in rows])
    close(score_last_token(rm, tokens, mask), want, "the score is the scalar at each row's last "
          "real token, whatever the padding on either side", atol=1e-5)
    close(score_last_token(rm, tokens, mask, offset=0.3), want - 0.3,
          "the offset is subtracted", atol=1e-5)


# ----------------------------------------------------------------------------------- DPO

def test_dpo_loss_is_log2_and_rewards_zero_when_policy_equals_reference():
    lp = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0])
    for ls in (0.0, 0.2):
        losses, cr, rr = dpo_loss(lp[0], lp[1], lp[0], lp[1], beta=0.1, label_smoothing=ls)
        close(losses, torch.full((2,), LOG2), f"policy = reference: h = 0 and each pair's loss is "
              f"log 2 (label_smoothing {ls}); h subtracts the reference's log-ratio")
        close(cr, torch.zeros(2), "implicit reward of the chosen = beta (log pi - log pi_ref) = 0")
        close(rr, torch.zeros(2), "implicit reward of the rejected = beta (log pi - log pi_ref) "
              "= 0")
    ipo, _, _ = dpo_loss(lp[0], lp[1], lp[0], lp[1], beta=0.1, ipo=True)
    close(ipo, torch.full((2,), 1 / (4 * 0.1 ** 2)), "IPO at h = 0: (0 - 1 / (2 beta))^2")


def test_dpo_gradient_is_minus_and_plus_half_beta_at_init():
    beta = 0.3
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.detach().clone(),
                                                        pr.detach().clone(), beta)
    assert not (chosen_rewards.requires_grad or rejected_rewards.requires_grad), \
        "the implicit rewards are statistics: return them detached"
    losses.sum().backward()
    close(pc.grad, torch.tensor([-beta / 2]), "at h = 0, dL/dlog pi(chosen) = -beta/2")
    close(pr.grad, torch.tensor([beta / 2]), "at h = 0, dL/dlog pi(rejected) = +beta/2")


def test_dpo_swap_identity_and_beta_scaling_of_rewards():
    beta, h = 0.5, torch.tensor([0.7, -1.3])
    zero = torch.zeros(2)
    l_pos = dpo_loss(h, zero, zero, zero, beta)[0]
    l_neg = dpo_loss(zero, h, zero, zero, beta)[0]
    close(l_pos - l_neg, -beta * h, "swapping chosen and rejected: L(h) - L(-h) = -beta h",
          atol=1e-6)
    _, c1, _ = dpo_loss(h, zero, zero, zero, 0.1)
    _, c2, _ = dpo_loss(h, zero, zero, zero, 0.2)
    close(c2, 2 * c1, "the implicit reward beta (log pi - log pi_ref) doubles with beta")


def test_ipo_and_conservative_dpo_match_their_formulas_and_optima():
    beta, eps, h = 0.25, 0.1, torch.tensor([0.4, 3.0])
    zero = torch.zeros(2)
    ipo = dpo_loss(h, zero, zero, zero, beta, ipo=True)[0]
    close(ipo, (h - 1 / (2 * beta)) ** 2, "IPO: (h - 1 / (2 beta))^2")
    cdpo = dpo_loss(h, zero, zero, zero, beta, label_smoothing=eps)[0]
    sig = torch.sigmoid(beta * h)
    close(cdpo, -(1 - eps) * torch.log(sig) - eps * torch.log(1 - sig),
          "cDPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)", atol=1e-6)
    # cDPO's minimiser is finite: h* = log((1 - eps) / eps) / beta
    hs = torch.tensor([math.log((1 - eps) / eps) / beta], requires_grad=True)
    zero = torch.zeros(1)
    dpo_loss(hs, zero, zero, zero, beta, label_smoothing=eps)[0].sum().backward()
    close(hs.grad, torch.zeros(1), "cDPO's gradient vanishes at h* = log((1 - eps) / eps) / beta",
          atol=1e-6)


def test_reference_free_dpo_ignores_reference_logprobs():
    pc, pr = torch.tensor([-2.0]), torch.tensor([-3.0])
    a = dpo_loss(pc, pr, torch.tensor([-9.0]), torch.tensor([-1.0]), 0.1, reference_free=True)[0]
    b = dpo_loss(pc, pr, torch.tensor([0.0]), torch.tensor([5.0]), 0.1, reference_free=True)[0]
    close(a, b, "reference_free: the reference's log-probs do not enter the loss", atol=0, rtol=0)


def test_sequence_logps_sum_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 2, 3, -100]])
    logp = torch.log_softmax(logits, -1)
    close(sequence_logps(logits, labels), (logp[0, 1, 2] + logp[0, 2, 3]).reshape(1),
          "log pi(y|x) = the sum of the labelled tokens' log-probs (logits at t score the label at "
          "t + 1); prompt and padding (-100) do not count")


# ----------------------------------------------------------------------------------- PPO

def brute_force_gae(rewards, values, mask, gamma, lam):
    B, N = rewards.shape
    adv = torch.zeros(B, N)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            a = 0.0
            for k in range(t, n):
                v_next = values[b, k + 1] if k + 1 < n else 0.0
                delta = rewards[b, k] + gamma * v_next - values[b, k]
                a += (gamma * lam) ** (k - t) * delta
            adv[b, t] = a
    return adv


def test_gae_matches_brute_force_and_reward_to_go_when_gamma_lambda_one():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5]).bool()
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        close(adv, brute_force_gae(rewards, values, mask, gamma, lam),
              f"A_t = sum_k (gamma lam)^k delta_t+k, V = 0 after each row's last real token "
              f"(gamma {gamma}, lam {lam})", atol=1e-5)
        close(ret, (adv + values) * mask, "returns = advantages + values, 0 on padding")
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    close(ret, rtg, "gamma = lam = 1: returns = reward-to-go", atol=1e-5)
    close(adv, (rtg - values) * mask, "gamma = lam = 1: advantages = reward-to-go - V", atol=1e-5)
    assert (adv[~mask] == 0).all(), "advantages are 0 on padding"


def test_masked_whiten_has_mean_zero_std_one_over_the_mask_only():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 2
    mask = torch.rand(4, 7) > 0.3
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), torch.tensor(0.0), "whitened: mean 0 over the mask", atol=1e-5)
    close(masked_mean(w ** 2, mask), torch.tensor(1.0), "whitened: variance 1 over the mask, with "
          "the biased variance (divide by n, not n - 1)", atol=1e-4, rtol=0)
    x2 = x.clone()
    x2[~mask] = 1e6  # values outside the mask do not move the statistics
    close(masked_whiten(x2, mask), w, "values outside the mask do not move the statistics",
          atol=1e-5)
    kept = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(kept, mask), masked_mean(x, mask),
          "shift_mean=False: (x - mean) / std + mean keeps the mean", atol=1e-4)


def test_reward_sits_on_the_last_real_token_and_kl_sums_to_the_sequence_log_ratio():
    logp, ref = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, 0.1)
    assert (rewards[~mask] == 0).all() and (kl[~mask] == 0).all(), "padding gets no reward, no KL"
    seq_log_ratio = ((logp - ref) * mask).sum(1)
    close(kl.sum(1), seq_log_ratio, "k1 = log pi - log pi_ref per token; it sums to the sequence's "
          "log-ratio")
    close(rewards.sum(1), scores - 0.1 * seq_log_ratio, "sum_t r_t = score - beta * KL (a penalty: "
          "minus beta times log pi - log pi_ref)", atol=1e-6)
    no_kl, _ = per_token_rewards(scores, logp, ref, mask, 0.0)
    expected = torch.zeros(2, 5)
    expected[0, 2], expected[1, 4] = 2.0, -1.0
    close(no_kl, expected, "with beta = 0 the score alone sits on each row's last real token")


def test_kl_is_zero_when_policy_equals_reference_and_k3_is_nonnegative():
    lp = torch.randn(3, 4)
    for name, k in zip(("k1", "k2", "k3"), kl_estimates(lp, lp)):
        close(k, torch.zeros(3, 4), f"{name} = 0 where policy = reference")
    k1, k2, k3 = kl_estimates(torch.randn(100), torch.randn(100))
    assert (k3 >= 0).all(), f"k3 = (r - 1) - log r >= 0 for every r > 0; got min {k3.min():.3g}"
    assert (k2 >= 0).all() and (k1 < 0).any(), "k2 >= 0; k1 (the log-ratio) can be negative"


def test_k2_is_half_the_squared_log_ratio():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    close(kl_estimates(logp, ref)[1], 0.5 * (logp - ref) ** 2, "k2 = (log pi - log pi_ref)^2 / 2")


def test_k1_and_k3_are_unbiased_for_kl_on_an_enumerated_distribution():
    q = torch.tensor([0.5, 0.3, 0.2])  # the policy, which samples
    p = torch.tensor([0.2, 0.5, 0.3])  # the reference
    kl = (q * (q / p).log()).sum()
    k1, _, k3 = kl_estimates(q.log(), p.log())
    close((q * k1).sum(), kl, "E_pi[k1] = KL(pi || pi_ref)")
    close((q * k3).sum(), kl, "E_pi[k3] = KL(pi || pi_ref), with k3 = (r - 1) - log r and "
          "r = pi_ref / pi")


def test_first_ppo_step_has_ratio_one_and_no_clipping():
    torch.manual_seed(0)
    logp = torch.randn(4, 6)
    adv = torch.randn(4, 6)
    values, returns = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    loss, pg, vf, s = ppo_loss(logp, logp, adv, values, values, returns, mask, mask.sum(),
                               0.2, 0.2, 0.1)
    assert s["ratio"] == pytest.approx(1.0) and s["clipfrac"] == 0.0 and s["approxkl"] == 0.0, \
        f"first step (pi = pi_old): ratio 1, clipfrac 0, approxkl 0; got {s}"
    close(pg, -masked_mean(adv, mask), "ratio 1: the policy loss is -mean(A) over the valid tokens")
    close(vf, 0.5 * masked_mean((values - returns) ** 2, mask),
          "V = V_old: the value loss is 0.5 mean (V - R)^2 over the valid tokens")


def test_ppo_loss_divides_by_the_given_token_count_and_weighs_the_value_loss():
    """Under DDP or with several minibatches the loss is a share of a global token mean: sums
    over this minibatch's tokens divided by n_tokens (here 3 times its own count), not its mean."""
    torch.manual_seed(1)
    logp, old, adv = torch.randn(2, 5) * 0.1, torch.randn(2, 5) * 0.1, torch.randn(2, 5)
    values, old_values, returns = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    loss, pg, vf, _ = ppo_loss(logp, old, adv, values, old_values, returns, mask, 21, 0.2, 0.2,
                               0.1)
    ratio = torch.exp(logp - old)
    pg_tok = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    v_clip = old_values + (values - old_values).clamp(-0.2, 0.2)
    vf_tok = 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2)
    close(pg, (pg_tok * mask).sum() / 21, "pg_loss = sum over valid tokens / n_tokens", atol=1e-6)
    close(vf, (vf_tok * mask).sum() / 21, "vf_loss = sum over valid tokens / n_tokens", atol=1e-6)
    close(loss, pg + 0.1 * vf, "loss = pg_loss + vf_coef * vf_loss", atol=1e-6)


def test_clipped_objective_has_zero_gradient_beyond_the_clip_range():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratio e^0.5 > 1.2 and e^-0.5 < 0.8
    adv = torch.tensor([[1.0, -1.0]])  # pushing further in the direction the clip forbids
    mask = torch.ones(1, 2, dtype=torch.bool)
    v = torch.zeros(1, 2)
    _, pg, _, s = ppo_loss(new, old, adv, v, v, v, mask, 2, 0.2, 0.2, 0.1)
    pg.backward()
    close(new.grad, torch.zeros(1, 2), "beyond the clip range, on the side the advantage favours, "
          "the clipped term wins and the gradient is 0", atol=0, rtol=0)
    assert s["clipfrac"] == 1.0, f"both tokens are clipped: clipfrac 1, got {s['clipfrac']}"
    # inside the range: gradient -A * ratio / n
    new2 = torch.tensor([[0.05, -0.05]], requires_grad=True)
    ppo_loss(new2, old, adv, v, v, v, mask, 2, 0.2, 0.2, 0.1)[1].backward()
    close(new2.grad, -adv * torch.exp(new2.detach()) / 2, "inside the clip range the gradient of "
          "-A ratio / n_tokens is -A ratio / n_tokens")


def test_value_clipping_is_inactive_inside_the_range():
    v_old, ret = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 0.5]])
    v_new = torch.tensor([[0.1, -0.15, 0.05]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    zero = torch.zeros(1, 3)
    _, _, vf, _ = ppo_loss(zero, zero, zero, v_new, v_old, ret, mask, 3, 0.2, 0.2, 0.1)
    close(vf, 0.5 * ((v_new - ret) ** 2).mean(), "inside the value clip range: 0.5 mean (V - R)^2")


def test_adaptive_kl_controller_is_still_at_target_and_bounded():
    assert adaptive_kl_update(0.1, 6.0, 6.0, 64, 10000) == 0.1
    up = adaptive_kl_update(0.1, 100.0, 6.0, 1000, 10000)
    down = adaptive_kl_update(0.1, 0.0, 6.0, 1000, 10000)
    assert (up == pytest.approx(0.1 * (1 + 0.2 * 0.1))
            and down == pytest.approx(0.1 * (1 - 0.2 * 0.1)))


def test_make_optimizer_is_adamw_with_decay_on_matrices_only():
    """common.make_optimizer's fused AdamW takes the steps of PyTorch's textbook loop (rounding
    aside), and decays 2-D weights only: with zero gradients a matrix shrinks by lr * wd per step
    while biases and gains stay put."""
    from nanoalign.common import make_optimizer
    from nanoalign.model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16)
    models = [GPT(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], 1e-2, 0.1)
    matrices = [p for p in models[1].parameters() if p.dim() >= 2]
    vectors = [p for p in models[1].parameters() if p.dim() < 2]
    loop = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                              {"params": vectors, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    x = torch.randint(0, 40, (3, 16))
    for _ in range(5):
        for model, opt in zip(models, (fused, loop)):
            model(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    assert fused.param_groups[0]["fused"] and not loop.param_groups[0]["fused"]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-4)  # 1% of one step: rounding, not a different update
    model = models[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, 1e-2, 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 1e-2 * 0.1) if p.dim() >= 2 else before[n]
        assert torch.allclose(p, expected, atol=1e-7), n


def test_ppo_returns_are_raw_reward_to_go_computed_before_advantage_whitening():
    """Returns = raw advantages + values, taken before whitening. With gamma = lambda = 1
    they are the reward-to-go of the per-token rewards whatever the values; the advantages are
    whitened over the valid tokens (mean 0, std 1)."""
    from types import SimpleNamespace

    from nanoalign.train_ppo import PPOConfig, advantages_and_returns
    torch.manual_seed(0)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).bool()
    ro = SimpleNamespace(response_mask=mask, logprobs=torch.randn(3, 6),
                         ref_logprobs=torch.randn(3, 6), values=torch.randn(3, 6) * 3)
    scores = torch.tensor([1.0, -2.0, 0.5])
    cfg = PPOConfig(gamma=1.0, lam=1.0)
    advantages, returns, _ = advantages_and_returns(ro, scores, 0.1, cfg)
    rewards, _ = per_token_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, 0.1)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    close(returns, reward_to_go, "gamma = lam = 1: returns = the reward-to-go, i.e. raw advantages "
          "+ values, taken before the advantages are whitened", atol=1e-5)
    close(masked_mean(advantages, mask), torch.tensor(0.0), "the advantages come back whitened: "
          "mean 0 over the valid tokens", atol=1e-6)
    close(masked_mean(advantages ** 2, mask), torch.tensor(1.0), "the advantages come back "
          "whitened: variance 1 over the valid tokens", atol=1e-4, rtol=0)


def test_whitened_rewards_are_scaled_but_keep_their_mean():
    """--whiten_rewards: the per-token rewards are whitened without shifting their mean (a shift
    would change which answers the policy prefers) before GAE."""
    from types import SimpleNamespace

    from nanoalign.train_ppo import PPOConfig, advantages_and_returns
    torch.manual_seed(2)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool()
    ro = SimpleNamespace(response_mask=mask, logprobs=torch.randn(2, 5),
                         ref_logprobs=torch.randn(2, 5), values=torch.zeros(2, 5))
    scores = torch.tensor([3.0, -1.0])
    cfg = PPOConfig(gamma=1.0, lam=1.0, whiten_rewards=True)
    _, returns, _ = advantages_and_returns(ro, scores, 0.1, cfg)
    r, _ = per_token_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, 0.1)
    mean = r[mask].mean()
    std = ((r[mask] - mean) ** 2).mean().sqrt()  # biased, over the valid tokens
    scaled = ((r - mean) / std + mean) * mask
    close(returns, torch.flip(torch.cumsum(torch.flip(scaled, [1]), 1), [1]) * mask,
          "whiten_rewards: GAE runs on (r - mean) / std + mean of the valid tokens", atol=1e-5)


def test_clipped_surrogate_is_pessimistic_for_ppo_and_grpo_alike():
    """The max of the two terms (a min of the objective): beyond the clip range in the direction the
    advantage favours the gradient is 0; in the other direction the unclipped term keeps it."""
    from nanoalign.rl import clipped_surrogate
    from nanoalign.train_grpo import clipped_policy_loss
    old = torch.zeros(1, 4)
    # ratios e^.5 > 1.2, e^-.5 < 0.8
    new = torch.tensor([[0.5, -0.5, -0.5, 0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # cols 0-1: clipped; cols 2-3: still pulled back
    loss, ratio, clipped = clipped_surrogate(new, old, adv, 0.2)
    loss.sum().backward()
    close(loss, torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)),
          "per token: max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))")
    assert clipped.tolist() == [[True, True, False, False]], \
        f"clipped is True where the clipped term was chosen: expected the first two, got {clipped}"
    close(new.grad[0, :2], torch.zeros(2), "beyond the clip range on the side the advantage "
          "favours: no gradient", atol=0, rtol=0)
    close(new.grad[0, 2:], -adv[0, 2:] * ratio.detach()[0, 2:], "beyond the range on the other "
          "side the unclipped term keeps its gradient -A ratio")
    grpo_new = new.detach().clone().requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for a in (1.0, -1.0):  # GRPO: one advantage per response, broadcast over its tokens
        grpo_new.grad = None
        grpo_loss, s = clipped_policy_loss(grpo_new, old, torch.tensor([a]), mask, 0.2,
                                           ("token", 4))
        grpo_loss.backward()
        favoured = grpo_new.detach()[0] * a > 0  # the ratio moved the way the advantage pushes
        close(grpo_new.grad[0][favoured], torch.zeros(2), f"GRPO, advantage {a}: no gradient "
              "where the ratio left the clip range on the favoured side", atol=0, rtol=0)
        assert (grpo_new.grad[0][~favoured] != 0).all(), \
            f"GRPO, advantage {a}: the other side keeps its gradient; got {grpo_new.grad}"
        close(s["clipfrac"], torch.tensor(0.5), "GRPO: clipfrac = share of clipped tokens")


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    """ppo2's pessimistic value loss: outside the clip range the larger squared error counts."""
    v_old, ret = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    v_new = torch.tensor([[0.5, -0.5]])  # moved 0.5 towards / away from the return; clip range 0.2
    zero, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    _, _, vf, s = ppo_loss(zero, zero, zero, v_new, v_old, ret, mask, 2, 0.2, 0.2, 0.1)
    clipped = torch.tensor([[0.2, -0.2]])
    expected = 0.5 * torch.max((v_new - ret) ** 2, (clipped - ret) ** 2).mean()
    close(vf, expected, "vf_loss = 0.5 mean max((V - R)^2, (V_old + clip(V - V_old) - R)^2)")
    close(s["vf_clipfrac"], torch.tensor(0.5), "vf_clipfrac = share of tokens where the clipped "
          "error was larger")

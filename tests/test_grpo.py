"""Invariants of the critic-free estimators (GRPO, RLOO, Dr. GRPO) and of the k3-in-the-loss
gradient."""

import torch

from nanoalign.rl import kl_estimates
from nanoalign.train_grpo import clipped_policy_loss, group_advantages

from grading import close


def test_group_advantages_sum_to_zero_without_std_and_for_rloo():
    torch.manual_seed(0)
    r = torch.randn(5, 4)
    close(group_advantages(r, "grpo", scale_by_std=False), r - r.mean(1, keepdim=True),
          "Dr. GRPO (scale_by_std=False): R_i - the group's mean", atol=1e-6)
    close(group_advantages(r, "rloo").sum(1), torch.zeros(5), "RLOO's advantages sum to 0 in "
          "each group", atol=1e-6)
    close(group_advantages(r, "grpo").sum(1), torch.zeros(5), "GRPO's advantages sum to 0 in "
          "each group", atol=1e-5)


def test_rloo_baseline_excludes_the_sample_itself():
    torch.manual_seed(1)
    r = torch.randn(3, 5)
    brute = torch.zeros_like(r)
    for g in range(3):
        for i in range(5):
            others = [r[g, j] for j in range(5) if j != i]
            brute[g, i] = r[g, i] - sum(others) / len(others)
    close(group_advantages(r, "rloo"), brute, "RLOO: R_i minus the mean of the other G - 1 "
          "rewards of its group", atol=1e-6)
    # and equals G / (G - 1) times the mean-centred reward
    close(group_advantages(r, "rloo"), 5 / 4 * (r - r.mean(1, keepdim=True)),
          "RLOO = G / (G - 1) (R_i - the group's mean)", atol=1e-6)


def test_grpo_normalises_by_the_group_std():
    """Each group by its own mean and std: a group of large rewards and one of small ones get
    advantages of the same scale."""
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.01, 0.02, 0.03, 0.06]])
    adv = group_advantages(r, "grpo", eps=0.0)
    for g in range(2):
        close(adv[g], (r[g] - r[g].mean()) / r[g].std(), f"group {g}: (R - its mean) / its own "
              "std, the unbiased one (n - 1), as the references use")
    close(adv[0], adv[1], "groups of large and of small rewards get advantages of one scale",
          atol=1e-5)


def test_a_group_with_identical_rewards_has_zero_advantage_and_zero_policy_gradient():
    r = torch.full((1, 4), 0.7)
    for est in ("grpo", "rloo"):
        adv = group_advantages(r, est).view(-1)
        close(adv, torch.zeros(4), f"{est}: equal rewards give 0 advantages (eps keeps GRPO's "
              "division by a zero std finite)", atol=0, rtol=0)
        logprobs = torch.randn(4, 6, requires_grad=True)
        mask = torch.ones(4, 6, dtype=torch.bool)
        loss, _ = clipped_policy_loss(logprobs, logprobs.detach(), adv, mask, 0.2,
                                      ("token", mask.sum()))
        loss.backward()
        close(logprobs.grad, torch.zeros(4, 6), f"{est}: zero advantages give zero policy gradient",
              atol=0, rtol=0)


def test_first_update_has_ratio_one_and_token_vs_sequence_normalisation_differ_by_length():
    logprobs = torch.randn(2, 4)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    tok_loss, s = clipped_policy_loss(logprobs, logprobs, adv, mask, 0.2, ("token", mask.sum()))
    seq_loss, _ = clipped_policy_loss(logprobs, logprobs, adv, mask, 0.2, ("sequence", 2))
    assert s["ratio"] == 1.0 and s["clipfrac"] == 0.0, \
        f"first update (pi = pi_old): ratio 1 and clipfrac 0, got {s}"
    close(tok_loss, torch.tensor(-(4 * 1.0 - 0.5) / 5), "loss_norm token: the sum over every "
          "valid token / the token count (every token weighs the same)")
    close(seq_loss, torch.tensor(-(1.0 - 0.5) / 2), "loss_norm sequence: each response's token "
          "mean, summed / the response count (every response weighs the same)")


def test_k3_in_the_loss_has_the_gradient_of_reverse_kl_ref_to_policy():
    """On samples from pi, E_pi[grad k3] = grad KL(pi_ref || pi), not grad KL(pi || pi_ref) (Tang &
    Munos 2025)."""
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)
    ref = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()
    k3 = kl_estimates(logp, ref.log())[2]
    # exact expectation over an enumerated distribution
    (grad_k3,) = torch.autograd.grad((pi * k3).sum(), theta)
    reverse = (ref * (ref.log() - torch.log_softmax(theta, 0))).sum()
    (grad_reverse,) = torch.autograd.grad(reverse, theta)
    forward = (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref.log())).sum()
    (grad_forward,) = torch.autograd.grad(forward, theta)
    close(grad_k3, grad_reverse, "E_pi[grad k3] = grad KL(pi_ref || pi)", atol=1e-6)
    assert not torch.allclose(grad_k3, grad_forward, atol=1e-3), \
        "k3's gradient on samples from pi is not that of KL(pi || pi_ref)"


def test_dropped_groups_make_no_update_even_with_adam_momentum():
    """DAPO's dynamic sampling: a minibatch whose groups all agree is skipped, not stepped with zero
    gradients (Adam's momentum from earlier updates would still move the weights)."""
    import copy
    from nanoalign.common import Dist, make_optimizer
    from nanoalign.model import GPT, GPTConfig
    from nanoalign.rl import rollout
    from nanoalign.train_grpo import GRPOConfig, grpo_update
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = GRPOConfig(prompts_per_iter=2, group_size=2, minibatches=2, ppo_epochs=1, iterations=4)
    ro = rollout(policy, ref, [[1, 2, 3]] * 2 + [[4, 5]] * 2, end_id=39, pad_id=0, max_new_tokens=6,
                 temperature=1.0, generator=torch.Generator().manual_seed(0))
    optimizer = make_optimizer(policy, 1e-2, 0.0)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    keep = torch.ones(4, dtype=torch.bool)
    stats, _ = grpo_update(policy, optimizer, ro, advantages, keep, cfg, 0, Dist())
    assert stats  # a real update: Adam now has momentum
    before = [p.detach().clone() for p in policy.parameters()]
    keep = torch.zeros(4, dtype=torch.bool)
    stats, _ = grpo_update(policy, optimizer, ro, advantages, keep, cfg, 1, Dist())
    assert stats == []
    assert all(torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    keep = torch.tensor([True, True, False, False])
    stats, _ = grpo_update(policy, optimizer, ro, advantages, keep, cfg, 2, Dist())
    assert stats and any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))

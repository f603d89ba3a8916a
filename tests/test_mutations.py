"""Every classic bug has a test that catches it, and this module proves it.

Each row of BUGS is one small edit that reproduces a bug known to have hurt RLHF code (masking,
padding, the last real token, KL sign and estimators, GAE, whitening, clipping, the DDP
normalisation, DPO/IPO/cDPO, distillation's T^2, the KV cache, generation's end handling, bf16). For
each, the named tests run in a fresh process in which the module is imported with the edit applied
(conftest.MutationFinder), and at least one of them must fail. The micro run is the session's,
built by the correct code. `pytest -v tests/test_mutations.py` lists each bug with its catcher.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (name, file, correct text, buggy text, the fast tests that must catch it)
BUGS = [
    # masking and padding
    ("SFT trains on the prompt", "nanoalign/tokenizer.py",
     'labels += [-100] + (body if m["role"] == "assistant" else [-100] * len(body))',
     "labels += [-100] + body",
     "test_stages.py::test_sft_labels_cover_only_the_answer_and_padding_does_not_change_the_loss"),
    ("SFT labels not shifted", "nanoalign/train_sft.py",
     "labels[:, 1:]  # (B, T-1, V), (B, T-1)", "labels[:, :-1]",
     "test_losses.py::test_sft_loss_is_mean_response_token_nll_and_ignores_prompt_labels"),
    ("SFT normalised per micro-batch", "nanoalign/train_sft.py",
     "loss = sft_loss(model(tokens), labels, n_tokens) * d.world",
     "loss = sft_loss(model(tokens), labels, (labels[:, 1:] != -100).sum()) / cfg.grad_accum"
     " * d.world",
     "test_ddp.py::test_sft_gradient_accumulation_equals_one_big_batch"),
    ("SFT loss averaged over its own micro-batch", "nanoalign/train_sft.py",
     'reduction="sum") / n_tokens', 'reduction="mean")',
     "test_losses.py::"
     "test_sft_global_token_normalisation_makes_accumulation_equal_one_big_batch"),
    ("SFT without the world factor", "nanoalign/train_sft.py",
     "loss = sft_loss(model(tokens), labels, n_tokens) * d.world",
     "loss = sft_loss(model(tokens), labels, n_tokens)",
     "test_ddp.py::test_sft_two_identical_ranks_step_exactly_as_one_process"),
    ("DPO sums the prompt's log-probs too", "nanoalign/generate.py",
     "return (logp * (labels != -100)).sum(-1)", "return logp.sum(-1)",
     "test_losses.py::test_sequence_logps_sum_response_tokens_only"),
    ("left padding shifts the positions", "nanoalign/model.py",
     "pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]",
     "pos = torch.arange(past, S, device=pad_mask.device)[None].expand(pad_mask.size(0), -1)",
     "test_model.py::test_left_padding_gives_the_logits_of_the_unpadded_prompt "
     "test_model.py::test_positions_start_at_zero_after_left_padding"),
    ("attention reads the pad keys", "nanoalign/model.py",
     "mask = causal[None] & pad_mask[:, None, :]",
     "mask = causal[None].expand(pad_mask.size(0), -1, -1)",
     "test_model.py::test_left_padding_gives_the_logits_of_the_unpadded_prompt"),
    # the last real token
    ("RM reads the first pad", "nanoalign/rl.py",
     "rewards = scores.gather(1, last_true(mask)[:, None])",
     "rewards = scores.gather(1, mask.sum(1).clamp(max=mask.size(1) - 1)[:, None])",
     "test_losses.py::test_pair_rewards_read_each_answer_at_its_last_real_token"),
    ("RL reward read at the last column", "nanoalign/rl.py",
     "scores.gather(1, last_true(pad_mask)[:, None])", "scores[:, -1:]",
     "test_losses.py::test_score_last_token_ignores_padding_and_subtracts_the_offset"),
    ("PPO score on the first response token", "nanoalign/train_ppo.py",
     "rewards[torch.arange(len(scores)), last_true(mask)] += scores",
     "rewards[torch.arange(len(scores)), 0] += scores",
     "test_losses.py::"
     "test_reward_sits_on_the_last_real_token_and_kl_sums_to_the_sequence_log_ratio"),
    ("BT accuracy counts ties as right", "nanoalign/train_rm.py",
     "(diff > 0).float().mean()", "(diff >= 0).float().mean()",
     "test_losses.py::test_bt_loss_is_log2_at_ties_with_gradient_minus_half_and_zero_accuracy"),
    # rewards, KL and its estimators
    ("KL penalty with the wrong sign", "nanoalign/train_ppo.py",
     "kl = (logprobs - ref_logprobs) * mask", "kl = (ref_logprobs - logprobs) * mask",
     "test_losses.py::"
     "test_reward_sits_on_the_last_real_token_and_kl_sums_to_the_sequence_log_ratio"),
    ("k3 with the ratio upside down", "nanoalign/rl.py",
     "k3 = torch.expm1(-log_ratio) + log_ratio", "k3 = torch.expm1(log_ratio) - log_ratio",
     "test_losses.py::test_k1_and_k3_are_unbiased_for_kl_on_an_enumerated_distribution"),
    ("k2 without the half", "nanoalign/rl.py",
     "k2 = 0.5 * log_ratio ** 2", "k2 = log_ratio ** 2",
     "test_losses.py::test_k2_is_half_the_squared_log_ratio"),
    ("no penalty for answers that never end", "nanoalign/train_ppo.py",
     "scores = torch.where(ro.ended, scores, cfg.no_end_penalty)", "scores = scores",
     "test_stages.py::test_ppo_no_end_penalty_and_pluggable_reward_reach_the_rollout_scores"),
    ("reward offset not subtracted", "nanoalign/rl.py",
     "last_true(pad_mask)[:, None]).squeeze(1) - offset",
     "last_true(pad_mask)[:, None]).squeeze(1)",
     "test_losses.py::test_score_last_token_ignores_padding_and_subtracts_the_offset"),
    # GAE, whitening, returns
    ("GAE without the lambda recursion", "nanoalign/train_ppo.py",
     "last_adv = delta + gamma * lam * last_adv", "last_adv = delta",
     "test_losses.py::test_gae_matches_brute_force_and_reward_to_go_when_gamma_lambda_one"),
    ("GAE bootstraps without the discount", "nanoalign/train_ppo.py",
     "delta = rewards[:, t] + gamma * next_value - values[:, t]",
     "delta = rewards[:, t] + next_value - values[:, t]",
     "test_losses.py::test_gae_matches_brute_force_and_reward_to_go_when_gamma_lambda_one"),
    ("returns from whitened advantages", "nanoalign/train_ppo.py",
     "advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)\n"
     "    return masked_whiten(advantages, mask), returns, kl",
     "advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)\n"
     "    advantages = masked_whiten(advantages, mask)\n"
     "    return advantages, (advantages + ro.values) * mask, kl",
     "test_losses.py::test_ppo_returns_are_raw_reward_to_go_computed_before_advantage_whitening"),
    ("whitening counts the padding", "nanoalign/rl.py",
     "stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])",
     "stats = torch.stack([x.sum(), (x * x).sum(), torch.ones_like(mask).sum()])",
     "test_losses.py::test_masked_whiten_has_mean_zero_std_one_over_the_mask_only"),
    ("whitening with the unbiased variance", "nanoalign/rl.py",
     "var = total_sq / n - mean * mean", "var = (total_sq - n * mean * mean) / (n - 1)",
     "test_losses.py::test_masked_whiten_has_mean_zero_std_one_over_the_mask_only"),
    ("whitened rewards lose their mean", "nanoalign/train_ppo.py",
     "rewards = masked_whiten(rewards, mask, shift_mean=False)",
     "rewards = masked_whiten(rewards, mask)",
     "test_losses.py::test_whitened_rewards_are_scaled_but_keep_their_mean"),
    # clipping and the DDP normalisation
    ("clipped surrogate with min", "nanoalign/rl.py",
     "return torch.max(unclipped, clipped), ratio, clipped > unclipped",
     "return torch.min(unclipped, clipped), ratio, clipped > unclipped",
     "test_losses.py::test_clipped_objective_has_zero_gradient_beyond_the_clip_range "
     "test_losses.py::test_clipped_surrogate_is_pessimistic_for_ppo_and_grpo_alike"),
    ("value loss with min", "nanoalign/train_ppo.py",
     "torch.max(vf_unclipped, vf_clipped)", "torch.min(vf_unclipped, vf_clipped)",
     "test_losses.py::test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors"),
    ("PPO loss averaged over its own minibatch", "nanoalign/train_ppo.py",
     "pg_loss = masked_sum(pg, mask) / n_tokens", "pg_loss = masked_mean(pg, mask)",
     "test_losses.py::test_ppo_loss_divides_by_the_given_token_count_and_weighs_the_value_loss"),
    ("value loss without vf_coef", "nanoalign/train_ppo.py",
     "return pg_loss + vf_coef * vf_loss", "return pg_loss + vf_loss",
     "test_losses.py::test_ppo_loss_divides_by_the_given_token_count_and_weighs_the_value_loss"),
    ("PPO token count without the world size", "nanoalign/train_ppo.py",
     "n_tokens = common.all_reduce_sum(m.sum().float()) / d.world",
     "n_tokens = common.all_reduce_sum(m.sum().float())",
     "test_ddp.py::test_two_identical_ranks_give_one_process_gradients[ppo]"),
    ("GRPO count without the world size", "nanoalign/train_grpo.py",
     "count = common.all_reduce_sum(count.float()) / d.world",
     "count = common.all_reduce_sum(count.float())",
     "test_ddp.py::test_two_identical_ranks_give_one_process_gradients[grpo]"),
    # GRPO and RLOO
    ("GRPO normalises by the batch std", "nanoalign/train_grpo.py",
     "adv / (rewards.std(1, keepdim=True) + eps)", "adv / (rewards.std() + eps)",
     "test_grpo.py::test_grpo_normalises_by_the_group_std"),
    ("GRPO with the biased group std", "nanoalign/train_grpo.py",
     "adv / (rewards.std(1, keepdim=True) + eps)",
     "adv / (rewards.std(1, keepdim=True, unbiased=False) + eps)",
     "test_grpo.py::test_grpo_normalises_by_the_group_std"),
    ("RLOO's baseline includes the sample", "nanoalign/train_grpo.py",
     "return (rewards * G - rewards.sum(1, keepdim=True)) / (G - 1)", "return rewards - mean",
     "test_grpo.py::test_rloo_baseline_excludes_the_sample_itself"),
    ("GRPO sequence norm over tokens", "nanoalign/train_grpo.py",
     "loss = masked_mean(per_token, mask, dim=1).sum() / count",
     "loss = masked_sum(per_token, mask) / count",
     "test_grpo.py::"
     "test_first_update_has_ratio_one_and_token_vs_sequence_normalisation_differ_by_length"),
    ("dropped groups still step Adam", "nanoalign/train_grpo.py",
     "if count == 0:", "if False:",
     "test_grpo.py::test_dropped_groups_make_no_update_even_with_adam_momentum"),
    # DPO and its variants
    ("DPO forgets the reference", "nanoalign/train_dpo.py",
     "h = pi_logratios - ref_logratios", "h = pi_logratios",
     "test_losses.py::test_dpo_loss_is_log2_and_rewards_zero_when_policy_equals_reference"),
    ("DPO loss with the sign flipped", "nanoalign/train_dpo.py",
     "-(1 - label_smoothing) * F.logsigmoid(beta * h)",
     "-(1 - label_smoothing) * F.logsigmoid(-beta * h)",
     "test_losses.py::test_dpo_gradient_is_minus_and_plus_half_beta_at_init"),
    ("IPO's target without the 2", "nanoalign/train_dpo.py",
     "losses = (h - 1 / (2 * beta)) ** 2", "losses = (h - 1 / beta) ** 2",
     "test_losses.py::test_ipo_and_conservative_dpo_match_their_formulas_and_optima"),
    ("cDPO smoothing on the wrong side", "nanoalign/train_dpo.py",
     "- label_smoothing * F.logsigmoid(-beta * h)", "- label_smoothing * F.logsigmoid(beta * h)",
     "test_losses.py::test_ipo_and_conservative_dpo_match_their_formulas_and_optima"),
    # distillation
    ("distillation without T^2", "nanoalign/train_distill.py",
     "per_token = alpha * T * T * kl", "per_token = alpha * kl",
     "test_distill.py::"
     "test_soft_term_is_t_squared_times_forward_kl_and_zero_when_student_equals_teacher"),
    ("distillation's KL reversed", "nanoalign/train_distill.py",
     "kl = (t.exp() * (t - s)).sum(-1)", "kl = (s.exp() * (s - t)).sum(-1)",
     "test_distill.py::"
     "test_soft_term_is_t_squared_times_forward_kl_and_zero_when_student_equals_teacher"),
    ("distillation divided by its own token count", "nanoalign/train_distill.py",
     "return (per_token * m).sum() / n_tokens", "return (per_token * m).sum() / m.sum()",
     "test_distill.py::test_the_loss_is_divided_by_the_given_token_count_and_ignores_padding"),
    # generation: the KV cache, the end token, the temperature
    ("KV cache never advances", "nanoalign/model.py",
     "cache.len, cache.pos = S, cache.pos + 1", "cache.pos = cache.pos + 1",
     "test_model.py::test_cached_decoding_gives_the_full_forward_logits_at_every_step"),
    ("decoding attends to the prompt's pads", "nanoalign/model.py",
     'torch.where(real, 0.0, float("-inf"))', "0.0",
     "test_model.py::test_cached_decoding_gives_the_full_forward_logits_at_every_step"),
    ("KV cache writes every step at slot 0", "nanoalign/model.py",
     "kv[:, :, :, S - 1] = qkv", "kv[:, :, :, 0] = qkv",
     "test_model.py::test_cached_decoding_gives_the_full_forward_logits_at_every_step"),
    ("a forward with a cache writes at slot 0", "nanoalign/model.py",
     "self.kv[layer][:, :, :, self.len:S] =", "self.kv[layer][:, :, :, :k.size(2)] =",
     "test_model.py::test_cached_decoding_gives_the_full_forward_logits_at_every_step"),
    ("tokens after <|end|> are not padding", "nanoalign/generate.py",
     "tokens[:, t] = nxt.masked_fill_(done, pad_id)", "tokens[:, t] = nxt",
     "test_model.py::test_after_the_end_token_every_token_is_pad_and_masked"),
    ("log-probs ignore the temperature", "nanoalign/generate.py",
     "upcast(logits[:, start - 1:-1]) / temperature", "upcast(logits[:, start - 1:-1])",
     "test_model.py::test_sampled_tokens_logprobs_match_full_forward_at_the_sampling_temperature"),
    ("log-probs off by one position", "nanoalign/generate.py",
     "upcast(logits[:, start - 1:-1]) / temperature, tokens[:, start:]",
     "upcast(logits[:, start:]) / temperature, tokens[:, start:]",
     "test_model.py::test_sampled_tokens_logprobs_match_full_forward_at_the_sampling_temperature"),
    # dropout and precision
    ("attention dropout left on", "nanoalign/model.py",
     "            m.dropout = p\n", "            pass\n",
     "test_gpu_path.py::test_set_dropout_turns_off_attention_dropout_too"),
    ("old log-probs outside the update's autocast", "nanoalign/rl.py",
     "with autocast(str(tokens.device), dtype):", "with autocast(str(tokens.device), 'float32'):",
     "test_gpu_path.py::test_ppo_first_minibatch_has_ratio_exactly_one_in_every_precision"),
    ("DPO reference in fp32, policy in bf16", "nanoalign/train_dpo.py",
     "with torch.no_grad(), common.autocast(device, dtype):", "with torch.no_grad():",
     "test_gpu_path.py::test_dpo_stage_logs_loss_log2_at_its_first_step_in_bf16"),
    # the way out: Hugging Face's layout
    ("export keeps nn.Linear's (out, in) for HF's Conv1D", "nanoalign/export.py",
     "w.t().contiguous() if key.endswith(CONV1D) else w", "w",
     "test_export.py::test_our_importers_read_the_export_back_to_identical_logits"),
    ("export folds the RM offset with the wrong sign", "nanoalign/export.py",
     "c = head.bias.item() - offset", "c = head.bias.item() + offset",
     "test_export.py::test_reward_model_exports_as_sequence_classifier_with_the_offset_folded"),
]


def run_bug(bug, micro_run) -> tuple[int, str]:
    name, path, old, new, tests = bug
    env = {**os.environ, "NANOALIGN_MICRO_RUN": str(micro_run), "OMP_NUM_THREADS": "1",
           "NANOALIGN_MUTATION": json.dumps({"file": path, "old": old, "new": new})}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore"]
    cmd += [f"tests/{t}" for t in tests.split()]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def outcomes(micro_run):
    """Every bug's targeted tests, two processes at a time (one thread each)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([b[0] for b in BUGS], pool.map(lambda b: run_bug(b, micro_run), BUGS)))


def test_bug_list_covers_the_classic_families():
    assert len(BUGS) >= 20 and len({b[0] for b in BUGS}) == len(BUGS)


@pytest.mark.slow
@pytest.mark.parametrize("bug", BUGS, ids=[b[0] for b in BUGS])
def test_classic_bug_is_caught_by_its_test(bug, outcomes):
    name, path, old, new, tests = bug
    assert old in (ROOT / path).read_text(), f"{path} no longer holds the correct text; update BUGS"
    returncode, output = outcomes[name]
    assert returncode == 1 and " failed" in output, f"{name!r} survived {tests}:\n{output}"

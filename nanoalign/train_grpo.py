"""
Critic-free RL: GRPO (Shao et al. 2024, DeepSeekMath section 4.1) and RLOO (Ahmadian et al. 2024,
"Back to Basics"). No value head: sample G responses per prompt and use the group itself as the
baseline. With sequence rewards R_i = score_i - beta * sum_t (log pi - log pi_ref)(y_i,t) (the same
detached k1 penalty as PPO, folded into R_i),

    GRPO:  A_i = (R_i - mean_j R_j) / (std_j R_j + eps)   (--scale_by_std false: "Dr. GRPO")
    RLOO:  A_i = R_i - mean_{j != i} R_j                   (= G/(G-1) (R_i - mean_j R_j))

and every token of response i gets A_i ("Dr. GRPO": Liu et al. 2025). The loss is PPO's clipped
surrogate on per-token ratios (rl.clipped_surrogate, shared with train_ppo.py), so PPO and GRPO
differ only in the advantage estimator: a controlled comparison. Options from the follow-ups:
  --loss_norm token: the sum over all tokens of the batch / their number (DAPO, Yu et al. 2025; no
    length bias); --loss_norm sequence: the mean over responses of each one's token mean (the GRPO
    paper's 1/|o_i|);
  --drop_equal_groups: skip groups whose task scores are all equal (DAPO's dynamic sampling):
    without it their advantages are the KL term's differences alone, which the std normalisation
    blows up to unit scale;
  --kl_in_loss: the GRPO paper's k3 estimator inside the loss instead of the k1 penalty in the
    reward. Beware: on samples from pi its gradient is that of KL(pi_ref || pi), not
    KL(pi || pi_ref) (Tang & Munos 2025; tested).
Rewards: the learned reward model, a verifiable reward (exact answers of the world's task: RLVR),
the gold judge (an oracle ceiling, never evidence that the method works), or your own
module:function.

    python -m nanoalign.train_grpo --init out/tiny/sft/ckpt.pt --reward rm \
        --reward_model out/tiny/rm/ckpt.pt
    python -m nanoalign.train_grpo --init out/tiny/sft/ckpt.pt --reward verifiable \
        --prompts data/world/verifiable_train.jsonl
    torchrun --standalone --nproc_per_node=2 nanoalign/train_grpo.py --init out/tiny/sft/ckpt.pt
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.data import load_prompts, load_verifiable
from nanoalign.generate import response_logprobs
from nanoalign.model import GPT, set_dropout
from nanoalign.rl import (clipped_surrogate, kl_estimates, make_scorer, masked_mean, masked_sum,
                          mean_stats, policy_entropy, rollout)
from nanoalign.tokenizer import render_chat


@dataclass
class GRPOConfig:
    out_dir: str = "out/tiny/grpo"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/sft/ckpt.pt"  # SFT checkpoint: the initial policy and the reference
    # "rm", "verifiable" (exact answers), "gold" (an oracle), or "module:function"
    reward: str = "rm"
    reward_model: str = "out/tiny/rm/ckpt.pt"  # the reward model checkpoint (with --reward rm)
    # JSONL prompts (with "answer" fields for --reward verifiable)
    prompts: str = "data/world/prompts_rl.jsonl"
    estimator: str = "grpo"  # "grpo" (group-normalised) or "rloo" (leave-one-out baseline)
    group_size: int = 4  # G: responses sampled per prompt
    # prompts per iteration per rank (rollouts = prompts_per_iter * group_size)
    prompts_per_iter: int = 16
    iterations: int = 40  # iterations (rollout + update)
    minibatches: int = 4  # minibatches per epoch (each holds whole groups)
    ppo_epochs: int = 4  # passes over each rollout batch (1 = purely on-policy)
    max_new_tokens: int = 80  # response length limit
    temperature: float = 1.0  # sampling temperature, used in every log-prob too
    lr: float = 1e-4  # peak learning rate, annealed linearly to 0
    kl_coef: float = 0.05  # beta of the KL term
    # the k3 KL inside the loss (GRPO paper) instead of the k1 penalty in the reward
    kl_in_loss: bool = False
    scale_by_std: bool = True  # divide group advantages by the group std (false = Dr. GRPO)
    loss_norm: str = "token"  # "token" (DAPO) or "sequence" (GRPO paper)
    # skip groups whose task scores are all equal (DAPO's dynamic sampling)
    drop_equal_groups: bool = False
    cliprange: float = 0.2  # epsilon of the clipped ratio
    # score of responses that never emit <|end|> (not applied to verifiable rewards)
    no_end_penalty: float = -1.0
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    log_gold: bool = True  # also score rollouts with the built-in world's gold judge (logging)
    save_interval: int = 20  # iterations between checkpoints
    seed: int = 0  # sampling and minibatch order (prompts are taken in file order)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast; log-probs and losses in fp32)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this iteration (0 = run to the end)

    def validate(self):
        config.check(self.estimator in ("grpo", "rloo"), "estimator", "must be 'grpo' or 'rloo'")
        config.check(self.group_size >= 2, "group_size", "a group needs at least 2 responses")
        n, k = self.prompts_per_iter, self.minibatches
        config.check(0 < k <= n and n % k == 0, "prompts_per_iter",
                     f"must be > 0, a multiple of minibatches ({k})")
        config.check(self.iterations > 0 and self.ppo_epochs > 0, "iterations",
                     "iterations and ppo_epochs must be > 0")
        config.check(self.loss_norm in ("token", "sequence"), "loss_norm",
                     "must be 'token' or 'sequence'")
        config.check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        config.check(self.temperature > 0, "temperature", "must be > 0")


def group_advantages(rewards, estimator: str = "grpo", scale_by_std: bool = True,
                     eps: float = 1e-4):
    """rewards (n_groups, G) -> advantages (n_groups, G). GRPO: (R - mean) / (std + eps) (the
    unbiased std, as the reference implementations use); RLOO: R_i minus the mean of the other
    G - 1 rewards."""
    G = rewards.size(1)
    mean = rewards.mean(1, keepdim=True)
    if estimator == "rloo":  # R_i - (sum_j R_j - R_i) / (G - 1)
        return (rewards * G - rewards.sum(1, keepdim=True)) / (G - 1)
    adv = rewards - mean
    return adv / (rewards.std(1, keepdim=True) + eps) if scale_by_std else adv


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange, norm):
    """PPO's clipped surrogate per token (rl.clipped_surrogate), reduced as `norm` says:
    ("token", n_tokens) divides the masked sum by the global token count; ("sequence", n_seqs)
    averages each response's token mean over the global response count. logprobs, old_logprobs,
    mask (B, N); advantages (B,), broadcast over tokens. Returns (loss, statistics by name)."""
    per_token, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages[:, None],
                                                  cliprange)
    kind, count = norm
    if kind == "token":
        loss = masked_sum(per_token, mask) / count
    else:
        loss = masked_mean(per_token, mask, dim=1).sum() / count
    return loss, {"clipfrac": masked_mean(clipped.float(), mask),
                  "ratio": masked_mean(ratio.detach(), mask)}


def grpo_update(policy, optimizer, ro, advantages, keep, cfg: GRPOConfig, it: int,
                d: common.Dist):
    """Several epochs of clipped updates over shuffled minibatches of whole groups; `keep` (B,)
    masks out dropped groups. Losses are normalised by global counts (all ranks), so N ranks equal
    one process. A minibatch whose groups were all dropped is skipped: no optimizer step, since
    Adam's momentum would move the weights even with zero gradients. Returns (each update's
    statistics by name: an empty list if none was made; the last learning rate)."""
    n_prompts, G, mask = cfg.prompts_per_iter, cfg.group_size, ro.response_mask
    total_updates = cfg.iterations * cfg.ppo_epochs * cfg.minibatches
    per_minibatch = n_prompts // cfg.minibatches
    policy.train()
    updates = []
    for epoch in range(cfg.ppo_epochs):
        seed = cfg.seed + it * 997 + epoch
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))
        for k in range(cfg.minibatches):
            groups = perm[k * per_minibatch:(k + 1) * per_minibatch]
            mb = (groups[:, None] * G + torch.arange(G)).view(-1).to(mask.device)  # (groups * G,)
            m = mask[mb] & keep[mb, None]
            update = (it * cfg.ppo_epochs + epoch) * cfg.minibatches + k
            lr = common.lr_at(update, total_updates, cfg.lr, schedule="linear")
            count = m.sum() if cfg.loss_norm == "token" else m.any(1).sum()
            count = common.all_reduce_sum(count.float()) / d.world  # global normalisation
            if count == 0:  # every group here was dropped, on every rank (the count is global)
                continue
            common.set_lr(optimizer, lr)
            with common.autocast(d.device, cfg.dtype):
                logits = policy(ro.tokens[mb], pad_mask=ro.pad_mask[mb])
            logprobs = response_logprobs(logits, ro.tokens[mb], ro.P, cfg.temperature)
            loss, s = clipped_policy_loss(logprobs, ro.logprobs[mb], advantages[mb], m,
                                          cfg.cliprange, (cfg.loss_norm, count))
            if cfg.kl_in_loss:  # k3(pi, pi_ref) per token, with its gradient (GRPO eq. 3)
                k3 = kl_estimates(logprobs, ro.ref_logprobs[mb])[2]
                if cfg.loss_norm == "token":
                    loss = loss + cfg.kl_coef * masked_sum(k3, m) / count
                else:
                    loss = loss + cfg.kl_coef * masked_mean(k3, m, dim=1).sum() / count
            loss.backward()
            common.optimizer_step(policy, optimizer, cfg.grad_clip)
            entropy = policy_entropy(logits[:, ro.P - 1:-1], cfg.temperature, with_grad=False)
            updates.append({"loss": loss.detach(), "entropy": masked_mean(entropy, m), **s})
    return updates, lr


def train(cfg: GRPOConfig):
    # 0. set-up: ranks, the policy without a value head (a PPO parent's is dropped: the group is
    #    the baseline), the frozen reference, the prompts, the reward, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.init, stages=["sft", "grpo", "ppo", "dpo"])
    tok = record.checkpoint_tokenizer(parent)
    policy = set_dropout(GPT.from_checkpoint(parent, d.device, scalar_head=False), 0.0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    verifiable = cfg.reward == "verifiable"
    records = load_verifiable(cfg.prompts) if verifiable else \
        [{"prompt": m} for m in load_prompts(cfg.prompts)]
    prompt_ids = [render_chat(tok, r["prompt"], add_generation_prompt=True)[0] for r in records]
    score_fn = make_scorer(cfg.reward, cfg.reward_model, tok, d.device)
    log_gold = cfg.log_gold and not verifiable
    gold_fn = make_scorer("gold", None, tok, d.device) if log_gold else None
    G, n_prompts = cfg.group_size, cfg.prompts_per_iter
    config.check(max(map(len, prompt_ids)) + cfg.max_new_tokens <= policy.config.block_size,
                 "max_new_tokens", f"the longest prompt + {cfg.max_new_tokens} new tokens > "
                 f"block_size {policy.config.block_size}")
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5)
    # each rank samples its own stream: the ranks' rollouts must differ
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 100003 + d.rank)
    it, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["grpo"], tokenizer=tok.name)
        it = record.restore(ckpt, policy, optimizer, d)
        generator.set_state(ckpt["generators"][min(d.rank, len(ckpt["generators"]) - 1)])
    raw_policy, policy = policy, common.wrap_ddp(policy, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=it if cfg.resume else None)
    stop = common.StopSignal(d.device)

    def save():
        record.save_stage(ckpt_path, d, "grpo", raw_policy, optimizer, it, cfg, tok, cfg.init,
                          generators=record.generator_states(generator, d))

    bar = common.progress(cfg.iterations, it, cfg.estimator, not d.master)
    last = cfg.stop_at if cfg.stop_at > 0 else cfg.iterations
    while it < min(cfg.iterations, last):
        t0 = time.time()
        # 1. group rollouts: each of this rank's prompts G times (no group straddles two ranks)
        first = (it * d.world + d.rank) * n_prompts
        idx = [(first + i) % len(records) for i in range(n_prompts) for _ in range(G)]
        ro = rollout(raw_policy, ref, [prompt_ids[i] for i in idx], tok.end_id, tok.pad_id,
                     cfg.max_new_tokens, cfg.temperature, generator, dtype=cfg.dtype,
                     minibatch=n_prompts // cfg.minibatches * G)
        batch = [records[i] for i in idx]
        answers = [r["answer"] for r in batch] if verifiable else None
        scores = score_fn([r["prompt"] for r in batch], ro, answers)
        if not verifiable:  # the EOS trick
            scores = torch.where(ro.ended, scores, torch.full_like(scores, cfg.no_end_penalty))
        mask = ro.response_mask
        seq_kl = masked_sum(ro.logprobs - ro.ref_logprobs, mask, 1)  # k1 summed over a response
        rewards = scores if cfg.kl_in_loss else scores - cfg.kl_coef * seq_kl
        # 2. group baselines -> one advantage per response
        advantages = group_advantages(rewards.view(n_prompts, G), cfg.estimator,
                                      cfg.scale_by_std).view(-1)  # (n_prompts * G,)
        # groups whose task rewards are all equal say nothing (only the KL term differs)
        equal = scores.view(n_prompts, G).std(1) == 0  # (n_prompts,)
        keep = torch.ones_like(scores, dtype=torch.bool)  # (n_prompts * G,)
        if cfg.drop_equal_groups:
            keep = ~equal.repeat_interleave(G)
        # 3. clipped updates over minibatches of whole groups
        updates, lr = grpo_update(policy, optimizer, ro, advantages, keep, cfg, it, d)
        it += 1
        # 4. statistics over all ranks (each made the same updates: the skip test is global)
        gold = gold_fn([r["prompt"] for r in batch], ro) if gold_fn else None
        no_update = dict.fromkeys(["loss", "entropy", "clipfrac", "ratio"])  # logged as null
        g = common.all_reduce_mean({"score": scores.mean(),
                                    "gold": gold.mean() if gold_fn else None,
                                    "kl": seq_kl.mean(), "end_rate": ro.ended.float().mean(),
                                    "length": mask.sum(1).float().mean(),
                                    "zero_variance_groups": equal.float().mean(),
                                    **(mean_stats(updates) or no_update)}, d)
        log.log(iter=it, **g, lr=lr, iter_s=time.time() - t0)
        bar.update(1)
        bar.set_postfix(score=f"{g['score']:.2f}", kl=f"{g['kl']:.2f}")
        if it % cfg.save_interval == 0:
            save()
        if stop.should_stop():
            break
    bar.close()
    save()
    common.cleanup_dist()
    return raw_policy


def main(argv=None):
    return train(config.parse_config(GRPOConfig, argv, __doc__))


if __name__ == "__main__":
    main()

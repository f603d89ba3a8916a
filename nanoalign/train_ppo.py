"""
Stage 4: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022). Maximise

    E_{x ~ prompts, y ~ pi(.|x)} [ r(x, y) ] - beta * KL(pi(.|x) || pi_ref(.|x))

with the clipped PPO objective (Schulman et al. 2017). Each iteration: roll out responses with the
KV cache, score them, turn scores into per-token rewards, estimate advantages with GAE, then take
several epochs of clipped updates. The objective is ppo_loss below; its policy term is
rl.clipped_surrogate, which GRPO shares. Implementation details (numbered as in Huang et al. 2024,
"The N Implementation Details of RLHF with PPO"):
  - dropout off in the policy, the reference and the reward model;
  - pure sampling (no top-k/top-p), and every log-prob computed from logits / temperature (1);
  - old log-probs recomputed by the training forward on the same padded tensors, under the same
    autocast and at the same shapes, so the first ratio is exactly 1;
  - the reward model's score sits on the <|end|> token itself; responses that never end get the
    score -1 instead (the "EOS trick"); nothing after <|end|> counts in any loss or statistic;
  - per-token reward = -beta * (log pi - log pi_ref) (k1, detached), plus the score on the last
    token; beta fixed (0.05) or adaptive (Ziegler et al.'s proportional controller);
  - GAE with gamma = 1, lambda = 0.95; returns = advantages + values, taken *before* the advantages
    are whitened over the valid tokens of the whole batch (all ranks, biased variance);
  - clipped policy loss, clipped value loss (0.5 * max of squares), vf_coef 0.1, gradient
    clipping, lr annealed to 0.
Value function: a zero-initialised scalar head on the policy's own trunk (Ziegler et al. 2019): one
head, no second forward; the price is that value-loss gradients also move the policy's trunk (hence
vf_coef 0.1). Stiennon et al. use a separate critic initialised from the reward model: twice the
memory and compute, more stable. Left out: reward whitening by default (--whiten_rewards), a
separate critic, pretraining-loss mixing (InstructGPT's PPO-ptx).

    python -m nanoalign.train_ppo --init out/tiny/sft/ckpt.pt --reward_model out/tiny/rm/ckpt.pt
    torchrun --standalone --nproc_per_node=2 nanoalign/train_ppo.py --init out/tiny/sft/ckpt.pt
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.data import load_prompts
from nanoalign.generate import last_true, response_logprobs
from nanoalign.model import GPT, set_dropout
from nanoalign.rl import (clipped_surrogate, kl_estimates, make_scorer, masked_mean, masked_sum,
                          masked_whiten, mean_stats, policy_entropy, rollout)
from nanoalign.tokenizer import render_chat


@dataclass
class PPOConfig:
    out_dir: str = "out/tiny/ppo"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/sft/ckpt.pt"  # SFT checkpoint: the initial policy and the reference
    # "rm" (the learned reward model), "gold" (an oracle: the world's judge), or "module:function"
    reward: str = "rm"
    reward_model: str = "out/tiny/rm/ckpt.pt"  # the reward model checkpoint (with --reward rm)
    prompts: str = "data/world/prompts_rl.jsonl"  # JSONL records with a "prompt"
    iterations: int = 40  # PPO iterations (rollout + update)
    batch_size: int = 64  # rollouts per iteration per rank
    minibatches: int = 4  # minibatches (optimizer steps) per PPO epoch
    ppo_epochs: int = 4  # passes over each rollout batch
    max_new_tokens: int = 80  # response length limit
    temperature: float = 1.0  # sampling temperature, used in every log-prob too
    lr: float = 1e-4  # peak learning rate, annealed linearly to 0
    kl_coef: float = 0.05  # beta: weight of the per-token KL penalty in the reward
    adaptive_kl: bool = False  # adapt beta towards kl_target (Ziegler et al. 2019)
    kl_target: float = 6.0  # target of the summed per-sequence KL (nats), adaptive controller
    kl_horizon: int = 10000  # controller horizon in episodes
    gamma: float = 1.0  # discount (1: the reward only arrives at the end)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # epsilon of the clipped policy ratio
    cliprange_value: float = 0.2  # clip range of the value update
    vf_coef: float = 0.1  # weight of the value loss
    ent_coef: float = 0.0  # entropy bonus (0 = off, as in the references)
    no_end_penalty: float = -1.0  # score given to responses that never emit <|end|>
    whiten_rewards: bool = False  # whiten per-token rewards (without shifting the mean) before GAE
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    log_gold: bool = True  # also score rollouts with the built-in world's gold judge (logging)
    sample_interval: int = 10  # iterations between printed samples
    save_interval: int = 20  # iterations between checkpoints
    seed: int = 0  # sampling and minibatch order (prompts are taken in file order)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast; log-probs, losses, value head in fp32)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this iteration (0 = run to the end)

    def validate(self):
        n, k = self.batch_size, self.minibatches
        config.check(0 < k <= n and n % k == 0, "batch_size",
                     f"must be > 0, a multiple of minibatches ({k})")
        config.check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        config.check(self.reward != "verifiable", "reward", "the verifiable reward needs answers "
                     "per prompt: use python -m nanoalign.train_grpo --reward verifiable")
        config.check(self.temperature > 0, "temperature", "must be > 0 (sampling and log-probs)")
        config.check(0 <= self.lam <= 1 and 0 <= self.gamma <= 1, "lam",
                     "gamma and lam must be in [0, 1]")
        config.check(self.iterations > 0 and self.ppo_epochs > 0, "iterations",
                     "iterations and ppo_epochs must be > 0")


def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """r_t = -beta * k1_t on every response token, plus the score on the last real token.
    (B, N) each. The KL term is reward shaping: detached (the inputs come from the rollout)."""
    kl = (logprobs - ref_logprobs) * mask  # k1 per token
    rewards = -kl_coef * kl
    rewards[torch.arange(len(scores)), last_true(mask)] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, V after the last
    token = 0. Returns (advantages, returns = advantages + values), zero outside the mask, each
    (B, N)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    last_adv = torch.zeros_like(rewards[:, 0])
    N = rewards.size(1)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = delta + gamma * lam * last_adv
        advantages[:, t] = last_adv
    return advantages * mask, (advantages + values) * mask


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, n_tokens,
             cliprange, cliprange_value, vf_coef):
    """Clipped surrogate + clipped value loss (Schulman et al. 2017; OpenAI baselines ppo2), summed
    over the valid tokens and divided by n_tokens (the minibatch's token count over all ranks). All
    (B, N) but n_tokens. Returns (loss, pg_loss, vf_loss, statistics by name: detached tensors,
    means over this minibatch's tokens)."""
    pg, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)
    pg_loss = masked_sum(pg, mask) / n_tokens
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value,
                                              cliprange_value)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_sum(torch.max(vf_unclipped, vf_clipped), mask) / n_tokens
    stats = {"clipfrac": masked_mean(clipped.float(), mask),
             "approxkl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask),
             "vf_clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), mask),
             "ratio": masked_mean(ratio, mask)}
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, {k: v.detach() for k, v in stats.items()}


def adaptive_kl_update(kl_coef, kl, kl_target, n_steps, horizon):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""
    error = max(-0.2, min(0.2, kl / kl_target - 1))
    return kl_coef * (1 + error * n_steps / horizon)


def advantages_and_returns(ro, scores, kl_coef: float, cfg: PPOConfig):
    """Per-token rewards -> GAE. The returns are taken from the raw advantages, then the advantages
    are whitened over the valid tokens of the whole batch (all ranks). Returns (advantages,
    returns, per-token k1 KL), each (B, N)."""
    mask = ro.response_mask
    rewards, kl = per_token_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
    return masked_whiten(advantages, mask), returns, kl


def ppo_update(policy, optimizer, ro, advantages, returns, cfg: PPOConfig, it: int,
               d: common.Dist):
    """ppo_epochs passes over the rollout in shuffled minibatches, one optimizer step each. Token
    means are global: each minibatch's loss is divided by its token count summed over ranks, so 2
    ranks step exactly as 1 process. Returns (each minibatch update's statistics by name, the last
    learning rate)."""
    policy.train()
    mb_size, updates = cfg.batch_size // cfg.minibatches, []
    total_updates = cfg.iterations * cfg.ppo_epochs * cfg.minibatches
    for epoch in range(cfg.ppo_epochs):
        seed = cfg.seed + it * 997 + epoch
        perm = torch.randperm(cfg.batch_size, generator=torch.Generator().manual_seed(seed))
        for k in range(cfg.minibatches):
            mb = perm[k * mb_size:(k + 1) * mb_size].to(ro.tokens.device)
            m = ro.response_mask[mb]
            # / world: DDP averages the gradients over ranks, and we want their sum
            n_tokens = common.all_reduce_sum(m.sum().float()) / d.world
            update = (it * cfg.ppo_epochs + epoch) * cfg.minibatches + k
            lr = common.lr_at(update, total_updates, cfg.lr, schedule="linear")
            common.set_lr(optimizer, lr)
            with common.autocast(d.device, cfg.dtype):
                logits, values = policy(ro.tokens[mb], pad_mask=ro.pad_mask[mb], output="both")
            new_logprobs = response_logprobs(logits, ro.tokens[mb], ro.P, cfg.temperature)
            loss, pg_loss, vf_loss, s = ppo_loss(
                new_logprobs, ro.logprobs[mb], advantages[mb], values[:, ro.P - 1:-1],
                ro.values[mb], returns[mb], m, n_tokens=n_tokens, cliprange=cfg.cliprange,
                cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef)
            entropy = policy_entropy(logits[:, ro.P - 1:-1], cfg.temperature, cfg.ent_coef > 0)
            if cfg.ent_coef > 0:  # a bonus, normalised as the loss is: by the global token count
                loss = loss - cfg.ent_coef * masked_sum(entropy, m) / n_tokens
            loss.backward()
            common.optimizer_step(policy, optimizer, cfg.grad_clip)
            updates.append({"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
                            "entropy": masked_mean(entropy.detach(), m), **s})
    return updates, lr


def iteration_stats(ro, scores, gold, kl, returns) -> dict:
    """What an iteration's rollout says, by name: score, KL (k1 and k3, summed per response), end
    rate, length, and how much of the returns' variance the value head explains."""
    mask = ro.response_mask
    k3 = masked_sum(kl_estimates(ro.logprobs, ro.ref_logprobs)[2], mask, 1)
    residual, target = (returns - ro.values)[mask], returns[mask]
    explained = 1 - residual.var(unbiased=False) / target.var(unbiased=False).clamp(min=1e-8)
    return {"score": scores.mean(), "gold": gold.mean() if gold is not None else None,
            "kl": kl.sum(1).mean(), "kl_k3": k3.mean(), "end_rate": ro.ended.float().mean(),
            "length": mask.sum(1).float().mean(), "explained_variance": explained}


def train(cfg: PPOConfig):
    # 0. set-up: ranks, the policy with its value head (zero-initialised, so V = 0 at the start),
    #    the frozen reference, the reward, the prompts, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.init, stages=["sft", "ppo", "dpo", "grpo"])
    tok = record.checkpoint_tokenizer(parent)
    policy = set_dropout(GPT.from_checkpoint(parent, d.device), 0.0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    if policy.scalar_head is None:
        policy.add_scalar_head("zero")
    score_fn = make_scorer(cfg.reward, cfg.reward_model, tok, d.device)
    gold_fn = make_scorer("gold", None, tok, d.device) if cfg.log_gold else None
    prompts = load_prompts(cfg.prompts)
    prompt_ids = [render_chat(tok, m, add_generation_prompt=True)[0] for m in prompts]
    config.check(max(map(len, prompt_ids)) + cfg.max_new_tokens <= policy.config.block_size,
                 "max_new_tokens", f"the longest prompt + {cfg.max_new_tokens} new tokens > "
                 f"block_size {policy.config.block_size}")
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5)  # eps 1e-5, as the references
    # each rank samples its own stream: the ranks' rollouts must differ
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 100003 + d.rank)
    it, kl_coef, ckpt_path = 0, cfg.kl_coef, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["ppo"], tokenizer=tok.name)
        it, kl_coef = record.restore(ckpt, policy, optimizer, d), ckpt["kl_coef"]
        generator.set_state(ckpt["generators"][min(d.rank, len(ckpt["generators"]) - 1)])
    raw_policy, policy = policy, common.wrap_ddp(policy, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=it if cfg.resume else None)
    stop = common.StopSignal(d.device)

    def save():
        record.save_stage(ckpt_path, d, "ppo", raw_policy, optimizer, it, cfg, tok, cfg.init,
                          kl_coef=kl_coef, generators=record.generator_states(generator, d))

    bar = common.progress(cfg.iterations, it, "ppo", not d.master)
    last = cfg.stop_at if cfg.stop_at > 0 else cfg.iterations
    while it < min(cfg.iterations, last):
        t0 = time.time()
        # 1. rollout: this rank's prompts, sampled with the KV cache, then scored (no gradients)
        first = (it * d.world + d.rank) * cfg.batch_size
        batch = [(first + i) % len(prompts) for i in range(cfg.batch_size)]
        ro = rollout(raw_policy, ref, [prompt_ids[i] for i in batch], tok.end_id, tok.pad_id,
                     cfg.max_new_tokens, cfg.temperature, generator, with_values=True,
                     dtype=cfg.dtype, minibatch=cfg.batch_size // cfg.minibatches)
        batch_prompts = [prompts[i] for i in batch]
        scores = score_fn(batch_prompts, ro)
        scores = torch.where(ro.ended, scores, cfg.no_end_penalty)  # the EOS trick
        t_rollout = time.time() - t0
        # 2. rewards and advantages
        advantages, returns, kl = advantages_and_returns(ro, scores, kl_coef, cfg)
        # 3. PPO epochs over shuffled minibatches
        updates, lr = ppo_update(policy, optimizer, ro, advantages, returns, cfg, it, d)
        it += 1
        # 4. statistics over all ranks, the KL controller, logging
        gold = gold_fn(batch_prompts, ro) if gold_fn else None
        g = common.all_reduce_mean({**iteration_stats(ro, scores, gold, kl, returns),
                                    **mean_stats(updates)}, d)
        if cfg.adaptive_kl:  # every rank applies the same reduced KL: beta stays equal everywhere
            kl_coef = adaptive_kl_update(kl_coef, g["kl"], cfg.kl_target,
                                         cfg.batch_size * d.world, cfg.kl_horizon)
        log.log(iter=it, **g, kl_coef=kl_coef, lr=lr, rollout_s=t_rollout,
                iter_s=time.time() - t0)
        bar.update(1)
        bar.set_postfix(score=f"{g['score']:.2f}", kl=f"{g['kl']:.2f}")
        if d.master and cfg.sample_interval and it % cfg.sample_interval == 0:
            sample = tok.decode(ro.tokens[0].tolist())
            tqdm.write(f"iter {it}: {sample!r} score {scores[0].item():+.2f}")
        if it % cfg.save_interval == 0:
            save()
        if stop.should_stop():
            break
    bar.close()
    save()
    common.cleanup_dist()
    return raw_policy


def main(argv=None):
    return train(config.parse_config(PPOConfig, argv, __doc__))


if __name__ == "__main__":
    main()

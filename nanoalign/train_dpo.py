"""
Stage 5: direct preference optimisation (Rafailov et al. 2023). No reward model and no sampling:
with h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)] (sequence
log-probs, sums over the response tokens),

    DPO (eq. 7):              L = -log sigmoid(beta * h)
    conservative DPO (cDPO):  L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
    IPO (Azar et al. eq. 17): L = (h - 1 / (2 * beta))^2
    reference-free:           the reference log-ratio is taken to be 0

cDPO assumes labels flipped with probability eps, as our simulated annotators flip them (Mitchell
2023, "A note on DPO with noisy preferences"). A response's implicit reward is
beta * (log pi - log pi_ref) (DPO section 5). Chosen and rejected share one forward; the reference
reads the same batch tensors under the same autocast, without gradients: at initialisation h is
exactly 0 and the loss exactly log 2, in bf16 too.

Online (iterative) DPO (--online_rounds R): R rounds after the offline pass, each one pass over
fresh pairs of the current policy's own answers, labelled by the reward model (or --online_judge);
--online_update_ref moves the reference to the current policy at each round.

    python -m nanoalign.train_dpo --init out/tiny/sft/ckpt.pt --data data/world/prefs_train.jsonl
    torchrun --standalone --nproc_per_node=2 nanoalign/train_dpo.py --init out/tiny/sft/ckpt.pt
"""

import copy
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.batching import tokenize_all, tokenize_pref
from nanoalign.data import load_prefs, load_prompts
from nanoalign.model import GPT, set_dropout
from nanoalign.rl import (concatenated_logps, load_reward_model, mean_stats, reward_function,
                          rollout_pairs)


@dataclass
class DPOConfig:
    out_dir: str = "out/tiny/dpo"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint: the starting policy and the reference
    # pairs, JSONL or a JSON array: {prompt, chosen, rejected}, TRL's, Anthropic HH (data/README.md)
    data: str = "data/world/prefs_train.jsonl"
    val_data: str = "data/world/prefs_val.jsonl"  # held-out pairs
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping at the first
    max_len: int = 0  # truncate prompt + response to this many tokens (0 = block_size)
    beta: float = 0.1  # KL strength: a small beta lets the policy move far from the reference
    label_smoothing: float = 0.0  # cDPO: the assumed label-flip rate eps in [0, 0.5)
    ipo: bool = False  # use the IPO loss instead of the logistic one
    reference_free: bool = False  # ignore the reference model (its log-ratio = 0)
    batch_size: int = 32  # pairs per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the offline pairs
    lr: float = 1e-4  # peak learning rate (tiny models need far more than the paper's 1e-6)
    warmup: int = 10  # linear warmup steps
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 100  # steps between validation passes and checkpoints
    online_rounds: int = 0  # rounds of online DPO after the offline pass (0 = offline only)
    online_prompts: str = "data/world/prompts_rl.jsonl"  # prompts sampled in each online round
    online_pairs: int = 512  # prompts (= new pairs) per round
    # who labels online pairs: "rm" (needs --reward_model), "gold" (an oracle), "module:function"
    online_judge: str = "rm"
    reward_model: str = "out/tiny/rm/ckpt.pt"  # the reward model for online labelling
    online_update_ref: bool = False  # move the reference to the current policy at each round
    temperature: float = 1.0  # sampling temperature of the online responses
    max_new_tokens: int = 80  # response length limit in online rounds
    seed: int = 0  # data order and sampling
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float64 (exact comparisons)
    resume: bool = False  # continue the offline pass from out_dir/ckpt.pt where it stopped
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to the end)

    def validate(self):
        config.check(self.beta > 0, "beta", "must be > 0")
        config.check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        config.check(self.epochs > 0 or self.online_rounds > 0, "epochs", "0 epochs and 0 "
                     "online rounds train nothing: set --epochs > 0 or --online_rounds > 0")
        config.check(self.batch_size > 0 and self.grad_accum > 0, "batch_size",
                     "batch_size and grad_accum must be > 0")
        config.check(self.online_judge in ("rm", "gold") or ":" in self.online_judge,
                     "online_judge", "must be 'rm', 'gold' or 'module:function' (your own reward)")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float, label_smoothing=0.0, ipo=False, reference_free=False):
    """Per-pair losses and implicit rewards. All inputs (B,) sequence log-probs.
    Returns (losses, chosen_rewards, rejected_rewards), the rewards detached."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023, eq. 17 (beta plays tau)
    else:  # eps = 0 is DPO's eq. 7; eps > 0 is the conservative (label-smoothed) form
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def policy_and_reference_logps(policy, ref, pairs, pad_id, device, dtype):
    """The four sequence log-probs of the DPO loss. The reference reads the very same batch tensors
    under the same autocast as the policy (without gradients): at initialisation h is then exactly
    0, in bf16 too."""
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = concatenated_logps(ref, pairs, pad_id, device)
    with common.autocast(device, dtype):
        chosen, rejected = concatenated_logps(policy, pairs, pad_id, device)
    return chosen, rejected, ref_chosen, ref_rejected


@dataclass
class Run:
    """What every step of the offline pass and of the online rounds reads and writes."""
    cfg: DPOConfig
    d: common.Dist
    tok: object
    ddp_policy: torch.nn.Module  # what trains: the policy, DDP-wrapped under torchrun
    policy: torch.nn.Module  # the plain module: what is saved, sampled and validated
    ref: torch.nn.Module  # frozen
    optimizer: torch.optim.Optimizer
    log: record.MetricsLog
    stop: common.StopSignal
    val_set: list
    step: int = 0
    val_ref: dict = field(default_factory=dict)  # validation chunk -> the reference's log-probs


def save(run: Run):
    record.save_stage(os.path.join(run.cfg.out_dir, "ckpt.pt"), run.d, "dpo", run.policy,
                      run.optimizer, run.step, run.cfg, run.tok, run.cfg.init)


@torch.no_grad()
def validate(run: Run, chunk: int = 64) -> dict:
    """Held-out preference accuracy and mean margin of the implicit reward. The reference's
    log-probs of each chunk are computed once (the same chunks every time)."""
    model, pad_id, device = run.policy, run.tok.pad_id, run.d.device
    model.eval()
    margins = []
    for i in range(0, len(run.val_set), chunk):
        pairs = run.val_set[i:i + chunk]
        chosen, rejected = concatenated_logps(model, pairs, pad_id, device)
        if i not in run.val_ref:
            run.val_ref[i] = concatenated_logps(run.ref, pairs, pad_id, device)
        _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *run.val_ref[i],
                                                       run.cfg.beta)
        margins.append(chosen_rewards - rejected_rewards)
    margins = torch.cat(margins)
    model.train()
    return {"val_accuracy": (margins > 0).float().mean().item(),
            "val_margin": margins.mean().item()}


def dpo_step(run: Run, micro_batches: list[list]) -> dict:
    """One optimizer step over this rank's micro-batches; its statistics, averaged over ranks."""
    cfg, d = run.cfg, run.d
    micro_stats = []
    for micro, batch in enumerate(micro_batches):
        sync = micro == len(micro_batches) - 1
        with common.no_sync_unless(run.ddp_policy, d, sync):
            logps = policy_and_reference_logps(run.ddp_policy, run.ref, batch, run.tok.pad_id,
                                               d.device, cfg.dtype)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                *logps, cfg.beta, cfg.label_smoothing, cfg.ipo, cfg.reference_free)
        # every micro-batch and rank holds as many pairs: the mean of the means is the mean
        (losses.mean() / cfg.grad_accum).backward()
        chosen, rejected = logps[0].detach(), logps[1].detach()
        wins = (chosen_rewards > rejected_rewards).float()
        micro_stats.append({"loss": losses.detach().mean(), "rewards/chosen": chosen_rewards.mean(),
                            "rewards/rejected": rejected_rewards.mean(),
                            "rewards/accuracies": wins.mean(),
                            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                            "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()})
    common.optimizer_step(run.ddp_policy, run.optimizer, cfg.grad_clip)
    return common.all_reduce_mean(mean_stats(micro_stats), d)


def train_pass(run: Run, pairs: list, phase: str, first: int, n_steps: int, seed: int,
               layout: common.Dist) -> bool:
    """Steps first .. first + n_steps - 1 of the DPO loss over `pairs`. `layout` spreads a step's
    batch: over every rank (offline: one global batch, so 2 ranks = 1 process), or over this rank
    alone (online, common.Dist(): each rank trains on the pairs it sampled itself).
    Returns whether the pass ran to its end."""
    cfg, d = run.cfg, run.d
    per_rank = cfg.batch_size * cfg.grad_accum
    global_batch = per_rank * d.world
    bar = common.progress(n_steps, run.step - first, f"dpo {phase}", not d.master)
    t0, last = time.time(), cfg.stop_at if cfg.stop_at > 0 else first + n_steps
    while run.step < min(first + n_steps, last):
        lr = common.lr_at(run.step - first, n_steps, cfg.lr, cfg.warmup, schedule="linear")
        common.set_lr(run.optimizer, lr)
        idx = common.batch_indices(len(pairs), run.step - first, per_rank * layout.world, seed)
        micro_rows = [common.rank_rows(idx, m, layout, cfg.batch_size)
                      for m in range(cfg.grad_accum)]
        stats = dpo_step(run, [[pairs[i] for i in rows] for rows in micro_rows])
        run.step += 1
        dt, t0 = time.time() - t0, time.time()
        row = {"step": run.step, "phase": phase, **stats, "lr": lr,
               "pairs_per_s": global_batch / dt}
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", margin=f"{stats['rewards/margins']:.2f}")
        evaluate = run.val_set and (run.step % cfg.eval_interval == 0
                                    or run.step == first + n_steps)
        if evaluate:
            row.update(validate(run))
        run.log.log(**row)  # a NaN loss stops here, before any checkpoint
        if evaluate:
            save(run)
        if run.stop.should_stop():
            break
    bar.close()
    return run.step == first + n_steps


def load_pairs(path, tok, max_len, skip_bad):
    return tokenize_all(tokenize_pref, tok, load_prefs(path, skip_bad), max_len)


def online_pairs(cfg, d, tok, policy, rnd, max_len):
    """This rank's fresh pairs for round `rnd`: two samples per prompt from the current policy,
    ranked by the judge."""
    prompts = load_prompts(cfg.online_prompts)
    rm = load_reward_model(cfg.reward_model, d.device) if cfg.online_judge == "rm" else None
    start = (rnd * d.world + d.rank) * cfg.online_pairs
    chunk = [prompts[(start + i) % len(prompts)] for i in range(cfg.online_pairs)]
    g = torch.Generator(device=d.device).manual_seed(cfg.seed * 100003 + rnd * 1009 + d.rank)
    judge = None if rm else reward_function(cfg.online_judge)
    return rollout_pairs(policy, tok, chunk, cfg.max_new_tokens, cfg.temperature, g, max_len,
                         rm=rm, judge=judge)


def train(cfg: DPOConfig):
    # 0. set-up: ranks, the policy (a PPO parent's value head dropped: DPO never reads it, and DDP
    #    stops on an unused parameter), its frozen copy as reference, the pairs, the optimizer
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.init, stages=["sft", "dpo", "ppo", "grpo"])
    tok = record.checkpoint_tokenizer(parent)
    policy = set_dropout(GPT.from_checkpoint(parent, d.device, scalar_head=False), 0.0)
    policy = common.with_precision(policy, cfg.dtype)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    max_len = cfg.max_len or policy.config.block_size
    config.check(max_len <= policy.config.block_size, "max_len", f"{max_len} > the block_size")
    train_set = load_pairs(cfg.data, tok, max_len, cfg.skip_bad) if cfg.epochs else []
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0)
    step = 0
    if cfg.resume:  # the offline pass continues from the saved step (online rounds restart)
        ckpt = record.load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), stages=["dpo"],
                                      tokenizer=tok.name)
        step = record.restore(ckpt, policy, optimizer, d)
    val_set = load_pairs(cfg.val_data, tok, max_len, cfg.skip_bad) if cfg.val_data else []
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=step if cfg.resume else None)
    run = Run(cfg=cfg, d=d, tok=tok, ddp_policy=common.wrap_ddp(policy, d), policy=policy,
              ref=ref, optimizer=optimizer, log=log, stop=common.StopSignal(d.device),
              val_set=val_set, step=step)
    # 1. the offline pass: --epochs over the pairs; at least one step, as in the reward model
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    offline_steps = max(1, int(cfg.epochs * len(train_set) / global_batch)) if train_set else 0
    if d.master:
        print(f"DPO on {len(train_set):,} pairs | {offline_steps} offline steps of {global_batch}")
    finished = not offline_steps or train_pass(run, train_set, "offline", 0, offline_steps,
                                               cfg.seed, layout=d)
    # 2. online rounds: fresh pairs from the current policy, labelled by the judge
    for rnd in range(cfg.online_rounds if finished else 0):
        pairs = online_pairs(cfg, d, tok, policy, rnd, max_len)
        if cfg.online_update_ref:  # iterative DPO: the last round's policy becomes the reference
            ref.load_state_dict(policy.state_dict())
            run.val_ref.clear()
        # ranks drop different numbers of ties but must take as many steps (or DDP waits
        # forever); a rank left without pairs (every one a tie) makes the whole round skip
        n_local = max(1, len(pairs) // (cfg.batch_size * cfg.grad_accum)) if pairs else 0
        n_steps = common.all_reduce_min(n_local, d.device)
        if n_steps == 0:
            if d.master:
                print(f"online round {rnd}: a rank has no pairs (each was a tie): round skipped")
            continue
        if not train_pass(run, pairs, f"online{rnd}", run.step, n_steps, cfg.seed + 1 + rnd,
                          layout=common.Dist()):
            break
    config.check(run.step > 0, "online_rounds", "each round was skipped (ties): nothing trained")
    save(run)
    common.cleanup_dist()
    return policy


def main(argv=None):
    return train(config.parse_config(DPOConfig, argv, __doc__))


if __name__ == "__main__":
    main()

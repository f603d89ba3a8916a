"""
Stage 5: direct preference optimisation (Rafailov et al. 2023). No reward model and no sampling: with
h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)] (sequence log-probs, sums over the
response tokens),

    DPO (eq. 7):                    L = -log sigmoid(beta * h)
    conservative DPO (cDPO):        L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
        (label smoothing: the labels are assumed flipped with probability eps, as our simulated annotators do;
         Mitchell 2023, "A note on DPO with noisy preferences")
    IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 * beta))^2
    reference-free:                 the reference log-ratio is taken to be 0

The implicit reward of a response is beta * (log pi - log pi_ref) (DPO section 5). Chosen and rejected run through one
concatenated forward. The reference reads the very same batch tensors under the same autocast, without gradients: at
initialisation h is then exactly 0 and the loss exactly log 2, in bf16 too.

Online (iterative) DPO (--online_rounds R): after the offline pass, R rounds of fresh feedback on the model's own
outputs: sample two responses per prompt from the current policy, label them with the reward model (or the gold judge,
--online_judge gold), train one pass on the new pairs, and optionally move the reference to the current policy.

    python -m nanoalign.train_dpo --init out/tiny/sft/ckpt.pt --data data/world/prefs_train.jsonl
    torchrun --standalone --nproc_per_node=2 nanoalign/train_dpo.py --init out/tiny/sft/ckpt.pt
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common
from nanoalign.data import concatenated_batch, load_prefs, load_prompts, tokenize_pref
from nanoalign.generate import upcast
from nanoalign.model import set_dropout
from nanoalign.rl import load_reward_model, mean_stats, reward_function, rollout_pairs
from nanoalign.tokenizer import load_tokenizer


@dataclass
class DPOConfig:
    out_dir: str = "out/tiny/dpo"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint: both the starting policy and the reference
    data: str = "data/world/prefs_train.jsonl"  # JSONL pairs: {prompt, chosen, rejected} or Anthropic HH
    val_data: str = "data/world/prefs_val.jsonl"  # held-out pairs
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping at the first one
    max_len: int = 0  # truncate prompt + response to this many tokens (0 = block_size)
    beta: float = 0.1  # KL strength: small beta lets the policy move far from the reference
    label_smoothing: float = 0.0  # cDPO: assumed label-flip rate eps in [0, 0.5)
    ipo: bool = False  # use the IPO loss instead of the logistic one
    reference_free: bool = False  # ignore the reference model (log-ratio of the reference = 0)
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
    online_judge: str = "rm"  # who labels online pairs: "rm" (needs --reward_model), "gold" (oracle), "module:function"
    reward_model: str = "out/tiny/rm/ckpt.pt"  # the reward model for online labelling
    online_update_ref: bool = False  # move the reference to the current policy at the start of each round
    temperature: float = 1.0  # sampling temperature of the online responses
    max_new_tokens: int = 80  # response length limit in online rounds
    seed: int = 0  # data order and sampling
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float64 (exact comparisons)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped (offline pass)
    strict: bool = False  # stop on any warning of the run doctor (common.Doctor), not only on a NaN loss
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to the end)

    def validate(self):
        common.check(self.beta > 0, "beta", "must be > 0")
        common.check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        common.check(self.epochs >= 0, "epochs", "must be >= 0")
        common.check(self.batch_size > 0 and self.grad_accum > 0, "batch_size", "batch_size and grad_accum must be > 0")
        common.check(self.online_judge in ("rm", "gold") or ":" in self.online_judge, "online_judge",
                     "must be 'rm', 'gold' or 'module:function' (your own reward)")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             label_smoothing: float = 0.0, ipo: bool = False, reference_free: bool = False):
    """Per-pair losses and implicit rewards. All inputs (B,) sequence log-probs. Returns (losses, chosen_rewards,
    rejected_rewards), rewards detached."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2  # Azar et al. 2023, eq. 17 (beta plays tau)
    else:  # eps = 0 is DPO's eq. 7; eps > 0 is the conservative (label-smoothed) form
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits, labels):
    """Sum of log p(label) over the response tokens (labels != -100), shifted by one. (B, T, V), (B, T) -> (B,)"""
    labels = labels[:, 1:]
    mask = labels != -100
    logp = torch.gather(F.log_softmax(upcast(logits[:, :-1]), -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def concatenated_logps(model, pairs, pad_id, device):
    """(chosen, rejected) sequence log-probs of a batch of pairs, in one forward of 2B rows."""
    tokens, labels, _ = concatenated_batch(pairs, pad_id, device)
    logps = sequence_logps(model(tokens), labels)  # (2B,); right-padded, so no attention mask is needed (model.py)
    return logps[:len(pairs)], logps[len(pairs):]


def policy_and_reference_logps(policy, ref, pairs, pad_id, device, dtype):
    """The four sequence log-probs of the DPO loss. The reference reads the very same batch tensors under the
    same autocast as the policy (without gradients): at initialisation h is then exactly 0, in bf16 too."""
    with torch.no_grad(), common.autocast(device, dtype):
        ref_chosen, ref_rejected = concatenated_logps(ref, pairs, pad_id, device)
    with common.autocast(device, dtype):
        chosen, rejected = concatenated_logps(policy, pairs, pad_id, device)
    return chosen, rejected, ref_chosen, ref_rejected


def train(cfg: DPOConfig):
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = common.load_checkpoint(cfg.init, stages=["sft", "dpo", "ppo", "grpo"])
    tok = load_tokenizer(parent["tokenizer_path"])
    # a PPO parent's value head is dropped: DPO never reads it, and DDP stops on an unused parameter
    policy = set_dropout(common.build_model(parent, d.device, scalar_head=False), 0.0)
    policy = common.with_precision(policy, cfg.dtype)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    max_len = cfg.max_len or policy.config.block_size
    common.check(max_len <= policy.config.block_size, "max_len", f"{max_len} > the model's block_size")
    train_set = [tokenize_pref(tok, ex, max_len) for ex in load_prefs(cfg.data, cfg.skip_bad)] if cfg.epochs else []
    val_set = [tokenize_pref(tok, ex, max_len) for ex in load_prefs(cfg.val_data, cfg.skip_bad)] if cfg.val_data else []

    optimizer = common.make_optimizer(policy, cfg.lr, 0.0)
    raw_policy, step, ckpt_path = policy, 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = common.load_checkpoint(ckpt_path, stages=["dpo"], tokenizer=tok.name)
        step = common.restore(ckpt, policy, optimizer, d)
    policy = common.wrap_ddp(policy, d)
    log = common.MetricsLog(cfg.out_dir, cfg, d.master, step if cfg.resume else None)
    stop = common.StopSignal(d.device)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    val_ref = {}  # validation chunk -> the reference's log-probs: the same chunks every time, computed once

    def save():
        common.save_stage(ckpt_path, d, "dpo", raw_policy, optimizer, step, cfg, tok, parent["tokenizer_path"],
                          cfg.init)

    @torch.no_grad()
    def validate():
        raw_policy.eval()
        acc, margin = [], []
        for i in range(0, len(val_set), 64):
            pairs = val_set[i:i + 64]
            pc, pr = concatenated_logps(raw_policy, pairs, tok.pad_id, d.device)
            if i not in val_ref:
                val_ref[i] = concatenated_logps(ref, pairs, tok.pad_id, d.device)
            rc, rr = val_ref[i]
            _, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta)
            acc.append((cr > rj).float())
            margin.append(cr - rj)
        raw_policy.train()
        return {"val_accuracy": torch.cat(acc).mean().item(), "val_margin": torch.cat(margin).mean().item()}

    def run_pass(pairs, tag: str, first: int, n_steps: int, seed: int, local: bool):
        """n_steps optimizer steps of the DPO loss over `pairs`. The offline pass slices one global batch across ranks
        (so 2 ranks = 1 process); in online rounds each rank trains on the pairs it sampled itself (local=True)."""
        nonlocal step
        per_rank = cfg.batch_size * cfg.grad_accum
        bar = common.progress(n_steps, step - first, f"dpo {tag}", not d.master)
        t0, last = time.time(), cfg.stop_at if cfg.stop_at > 0 else first + n_steps
        while step < min(first + n_steps, last):
            lr = common.lr_at(step - first, n_steps, cfg.lr, cfg.warmup, schedule="linear")
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = common.batch_indices(len(pairs), step - first, per_rank if local else global_batch, seed)
            micro_stats = []
            for micro in range(cfg.grad_accum):
                rows = idx[micro * cfg.batch_size:(micro + 1) * cfg.batch_size] if local else \
                    common.rank_rows(idx, micro, d, cfg.batch_size)
                batch = [pairs[i] for i in rows]
                sync = micro == cfg.grad_accum - 1
                with common.no_sync_unless(policy, d, sync):
                    pc, pr, rc, rr = policy_and_reference_logps(policy, ref, batch, tok.pad_id, d.device,
                                                                cfg.dtype)
                    losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing, cfg.ipo,
                                              cfg.reference_free)
                (losses.mean() / cfg.grad_accum).backward()  # equal pairs per micro-batch and rank: mean of means
                micro_stats.append({"loss": losses.detach().mean(), "rewards/chosen": cr.mean(),
                                    "rewards/rejected": rj.mean(), "rewards/accuracies": (cr > rj).float().mean(),
                                    "rewards/margins": (cr - rj).mean(), "logps/chosen": pc.detach().mean(),
                                    "logps/rejected": pr.detach().mean()})
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            s = common.global_means(mean_stats(micro_stats), d)
            dt, t0 = time.time() - t0, time.time()
            row = {"step": step, "phase": tag, **s, "lr": lr, "pairs_per_s": global_batch / dt}
            bar.update(1)
            bar.set_postfix(loss=f"{s['loss']:.3f}", margin=f"{s['rewards/margins']:.2f}")
            evaluate = val_set and (step % cfg.eval_interval == 0 or step == first + n_steps)
            if evaluate:
                row.update(validate())
            log.log(**row)  # the run doctor reads the row first: a NaN loss never reaches a checkpoint
            if evaluate:
                save()
            if stop.should_stop():
                break
        bar.close()
        return step == first + n_steps

    offline_steps = int(cfg.epochs * len(train_set) / global_batch) if train_set else 0
    # on --resume the offline pass continues from the saved step (online rounds are not resumable mid-way)
    finished = run_pass(train_set, "offline", 0, offline_steps, cfg.seed, local=False) if offline_steps else True
    for rnd in range(cfg.online_rounds if finished else 0):
        pairs = online_pairs(cfg, d, tok, raw_policy, rnd, max_len)
        if cfg.online_update_ref:  # iterative DPO: the policy of the last round becomes the new reference
            ref.load_state_dict(raw_policy.state_dict())
            val_ref.clear()
        # ranks drop different numbers of ties, but must take the same number of steps (or DDP waits forever);
        # a rank left without pairs (every one a tie) makes the whole round skip
        n_local = max(1, len(pairs) // (cfg.batch_size * cfg.grad_accum)) if pairs else 0
        n_steps = common.all_reduce_min(n_local, d.device)
        if n_steps == 0:
            if d.master:
                print(f"online round {rnd}: a rank has no pairs (every sampled pair was a tie): round skipped")
            continue
        if not run_pass(pairs, f"online{rnd}", step, n_steps, cfg.seed + 1 + rnd, local=True):
            break
    save()
    common.cleanup_dist()
    return raw_policy


def online_pairs(cfg, d, tok, policy, rnd, max_len):
    """This rank's fresh pairs for round `rnd`: two samples per prompt from the current policy, ranked by the judge."""
    prompts = load_prompts(cfg.online_prompts)
    rm = load_reward_model(cfg.reward_model, d.device) if cfg.online_judge == "rm" else None
    start = (rnd * d.world + d.rank) * cfg.online_pairs
    chunk = [prompts[(start + i) % len(prompts)] for i in range(cfg.online_pairs)]
    g = torch.Generator(device=d.device).manual_seed(cfg.seed * 100003 + rnd * 1009 + d.rank)  # per-rank sampling
    return rollout_pairs(policy, tok, chunk, cfg.max_new_tokens, cfg.temperature, g, max_len,
                         rm=rm, judge=None if rm else reward_function(cfg.online_judge))


def main(argv=None):
    return train(common.parse_config(DPOConfig, argv, __doc__))


if __name__ == "__main__":
    main()

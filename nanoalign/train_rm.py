"""
Stage 3: the reward model. Learn the (simulated) humans' preferences with the Bradley-Terry model:

    P(y_w preferred to y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))
    L = -log sigmoid(r(x, y_w) - r(x, y_l) - m)

(Stiennon et al. 2020 eq. 1; Ouyang et al. 2022 eq. 1; m is an optional margin, 0 by default).
r is the SFT transformer with a scalar head read at the last real token of prompt + response, the
<|end|> (Huang et al. 2024, detail 12; rl.pair_rewards): reading a pad token instead is the classic
bug, and the tests check for it. Chosen and rejected go through one concatenated forward. One epoch
by default: reward models overfit quickly (InstructGPT appendix C.2).

After training the reward is shifted so that the SFT data's reference responses score 0 on average
(Stiennon et al. 2020; InstructGPT section 3.5): Bradley-Terry only sees differences, so the offset
is free, and a zero mean makes PPO's KL penalty and score comparable across runs. The offset is
stored in the checkpoint and subtracted by every scorer.

    python -m nanoalign.train_rm --init out/tiny/sft/ckpt.pt --data data/world/prefs_train.jsonl
    torchrun --standalone --nproc_per_node=2 nanoalign/train_rm.py --init out/tiny/sft/ckpt.pt
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.agreement import MARGIN_BUCKETS
from nanoalign.batching import pad, tokenize_all, tokenize_pref, tokenize_sft
from nanoalign.data import load_prefs, load_sft
from nanoalign.model import GPT, set_dropout
from nanoalign.rl import mean_stats, pair_rewards, score_last_token


@dataclass
class RMConfig:
    out_dir: str = "out/tiny/rm"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint the reward model starts from
    # pairs, JSONL or a JSON array: {prompt, chosen, rejected}, TRL's, Anthropic HH (data/README.md)
    data: str = "data/world/prefs_train.jsonl"
    # held-out pairs (with gold_chosen/gold_rejected: the agreement with the gold judge)
    val_data: str = "data/world/prefs_val.jsonl"
    # SFT data whose reference responses are shifted to score 0 on average
    norm_data: str = "data/world/sft_train.jsonl"
    norm_examples: int = 1000  # how many of them to average for the offset
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping at the first
    max_len: int = 0  # truncate prompt + response to this many tokens (0 = block_size)
    batch_size: int = 32  # pairs per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the pairs (one: more overfits)
    lr: float = 3e-4  # peak learning rate
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on 2-D weights
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    margin: float = 0.0  # BT margin m (Llama 2 style); 0 = plain Bradley-Terry
    eval_interval: int = 125  # steps between validation passes and checkpoints
    seed: int = 0  # data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float64 (exact comparisons)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to the end)

    def validate(self):
        config.check(self.epochs > 0, "epochs", "must be > 0")
        config.check(self.batch_size > 0 and self.grad_accum > 0, "batch_size",
                     "batch_size and grad_accum must be > 0")
        config.check(self.lr > 0, "lr", "must be > 0")


def bt_loss(chosen_rewards, rejected_rewards, margin: float = 0.0):
    """Bradley-Terry loss and metrics (detached tensors). chosen_rewards, rejected_rewards: (B,).
    Accuracy is strict (ties count as wrong)."""
    diff = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(diff - margin).mean()
    return loss, {"accuracy": (diff > 0).float().mean(), "margin": diff.detach().mean()}


@torch.no_grad()
def evaluate_pairs(model, pairs, gold, pad_id, device, batch_size=64):
    """Accuracy against the (noisy) labels, and agreement with the gold judge, overall and per
    gold-margin bucket."""
    model.eval()
    diffs = []
    for i in range(0, len(pairs), batch_size):
        chosen, rejected = pair_rewards(model, pairs[i:i + batch_size], pad_id, device)
        diffs.append(chosen - rejected)
    model.train()
    diff = torch.cat(diffs).cpu()
    out = {"val_accuracy": (diff > 0).float().mean().item(),
           "val_loss": -F.logsigmoid(diff).mean().item()}
    if gold:
        gold_margin = torch.tensor([gc - gr for gc, gr in gold])
        agree = (diff > 0) == (gold_margin > 0)
        known = gold_margin != 0
        out["gold_agreement"] = agree[known].float().mean().item()
        for lo, hi in MARGIN_BUCKETS:
            bucket = known & (gold_margin.abs() >= lo) & (gold_margin.abs() < hi)
            if bucket.any():
                out[f"gold_agreement_margin_{lo}-{hi}"] = agree[bucket].float().mean().item()
    return out


@torch.no_grad()
def reward_offset(model, tok, path, n, max_len, device, batch_size=64):
    """Mean raw reward of the SFT data's reference responses: subtracted, they average 0."""
    examples = [ids for ids, _ in tokenize_all(tokenize_sft, tok, load_sft(path)[:n], max_len)]
    model.eval()
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        tokens = pad(chunk, tok.pad_id).to(device)
        mask = pad([[1] * len(e) for e in chunk], 0).bool().to(device)
        total += score_last_token(model, tokens, mask).sum().item()
    return total / len(examples)


def train(cfg: RMConfig):
    # 0. set-up: ranks, the SFT model with a fresh scalar head and no dropout (Huang et al.), the
    #    pairs, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.init, stages=["sft", "pretrain"])
    tok = record.checkpoint_tokenizer(parent)
    model = set_dropout(GPT.from_checkpoint(parent, d.device), 0.0).add_scalar_head("reward")
    model = common.with_precision(model, cfg.dtype)
    max_len = cfg.max_len or model.config.block_size
    config.check(max_len <= model.config.block_size, "max_len", f"{max_len} > the block_size")
    train_set = tokenize_all(tokenize_pref, tok, load_prefs(cfg.data, cfg.skip_bad), max_len)
    raw_val = load_prefs(cfg.val_data, cfg.skip_bad) if cfg.val_data else []
    val_set = tokenize_all(tokenize_pref, tok, raw_val, max_len)
    val_gold = [(ex["gold_chosen"], ex["gold_rejected"]) for ex in raw_val if "gold_chosen" in ex]
    val_gold = val_gold if len(val_gold) == len(val_set) else None
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    max_steps = max(1, int(cfg.epochs * len(train_set) / global_batch))
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["rm"], tokenizer=tok.name)
        step = record.restore(ckpt, model, optimizer, d)
    raw_model, model = model, common.wrap_ddp(model, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=step if cfg.resume else None)
    stop = common.StopSignal(d.device)
    if d.master:
        print(f"reward model on {len(train_set):,} pairs ({len(val_set):,} val) | {max_steps} "
              f"steps of {global_batch} pairs")

    def save(offset=None, metrics=None):
        record.save_stage(ckpt_path, d, "rm", raw_model, optimizer, step, cfg, tok, cfg.init,
                          reward_offset=offset, metrics=metrics)

    bar = common.progress(max_steps, step, "rm", not d.master)
    t0, last = time.time(), cfg.stop_at if cfg.stop_at > 0 else max_steps
    while step < min(max_steps, last):
        # 1. the Bradley-Terry loss over this rank's micro-batches of the global batch
        lr = common.lr_at(step, max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        common.set_lr(optimizer, lr)
        indices = common.batch_indices(len(train_set), step, global_batch, cfg.seed)
        rows = [train_set[i] for i in indices]
        micro_stats = []
        for micro in range(cfg.grad_accum):
            pairs = common.rank_rows(rows, micro, d, cfg.batch_size)
            sync = micro == cfg.grad_accum - 1
            with common.no_sync_unless(model, d, sync), common.autocast(d.device, cfg.dtype):
                chosen, rejected = pair_rewards(model, pairs, tok.pad_id, d.device)
                loss, stats = bt_loss(chosen, rejected, cfg.margin)
            # every micro-batch and rank holds as many pairs: the mean of the means is the mean
            (loss / cfg.grad_accum).backward()
            micro_stats.append({"loss": loss.detach(), **stats})
        # 2. the optimizer step
        common.optimizer_step(model, optimizer, cfg.grad_clip)
        step += 1
        # 3. log; validate and checkpoint every eval_interval steps
        s = common.all_reduce_mean(mean_stats(micro_stats), d)
        dt, t0 = time.time() - t0, time.time()
        bar.update(1)
        bar.set_postfix(loss=f"{s['loss']:.3f}", acc=f"{s['accuracy']:.2f}")
        row = dict(step=step, **s, lr=lr, pairs_per_s=global_batch / dt)
        if val_set and d.master and (step % cfg.eval_interval == 0 or step == max_steps):
            row.update(evaluate_pairs(raw_model, val_set, val_gold, tok.pad_id, d.device))
            gold = f", gold agreement {row['gold_agreement']:.3f}" if val_gold else ""
            tqdm.write(f"step {step}: val accuracy {row['val_accuracy']:.3f}{gold}")
        log.log(**row)
        if step % cfg.eval_interval == 0 and step < max_steps:
            save()
        if stop.should_stop():
            break
    bar.close()
    if step < max_steps:  # stopped early: keep the exact state for --resume
        save()
        common.cleanup_dist()
        return raw_model
    # 4. the offset that gives the SFT references mean 0; the final validation
    offset = 0.0
    if cfg.norm_data:
        offset = reward_offset(raw_model, tok, cfg.norm_data, cfg.norm_examples, max_len, d.device)
    final = evaluate_pairs(raw_model, val_set, val_gold, tok.pad_id, d.device) if val_set else {}
    if d.master:
        print(f"reward offset {offset:+.4f} (SFT reference responses now score 0 on average); "
              f"final {final}")
    save(offset, final)
    log.log(step=step, reward_offset=offset, **final)
    common.cleanup_dist()
    return raw_model


def main(argv=None):
    return train(config.parse_config(RMConfig, argv, __doc__))


if __name__ == "__main__":
    main()

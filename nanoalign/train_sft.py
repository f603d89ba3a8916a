"""
Stage 2: supervised fine-tuning (SFT) in the chat template.

    L = -(1 / N) sum over every response token t of the batch of log p(y_t | prompt, y_<t)

where N is the number of response tokens in the whole optimizer batch (all micro-batches, all
ranks). Only the assistant's tokens are trained, the closing <|end|> included, so the model learns
to answer *and to stop*; prompt and padding carry the label -100 (PyTorch's ignore_index). We
average per token over the global batch (as TRL and the DPO reference do), not per sequence: every
token counts the same, and the loss does not depend on how the batch is split into micro-batches or
ranks (transformers PR #34191 fixed exactly this for gradient accumulation).

    python -m nanoalign.train_sft --init out/tiny/pretrain/ckpt.pt --data data/world/sft_train.jsonl
    torchrun --standalone --nproc_per_node=2 nanoalign/train_sft.py --init out/tiny/pretrain/ckpt.pt
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # `torchrun nanoalign/train_sft.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, record
from nanoalign.batching import pad, tokenize_all, tokenize_sft
from nanoalign.data import load_sft
from nanoalign.generate import generate, upcast
from nanoalign.model import GPT, set_dropout
from nanoalign.tokenizer import render_chat


@dataclass
class SFTConfig:
    out_dir: str = "out/tiny/sft"  # checkpoint, metrics.jsonl and run.json go here
    init: str = "out/tiny/pretrain/ckpt.pt"  # the pretrained checkpoint to fine-tune
    # JSONL or a JSON array: {prompt, response or completion}, {messages}, ShareGPT, Alpaca...
    # (every shape: data/README.md)
    data: str = "data/world/sft_train.jsonl"
    val_data: str = "data/world/sft_val.jsonl"  # held-out SFT data for the validation loss
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping at the first
    max_len: int = 0  # truncate examples to this many tokens (0 = the model's block_size)
    batch_size: int = 32  # examples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay on 2-D weights
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    # residual/attention dropout while fine-tuning (InstructGPT used 0.2 at 1B+ scale)
    dropout: float = 0.0
    eval_interval: int = 100  # steps between validation losses, samples and checkpoints
    n_samples: int = 3  # validation prompts whose greedy answers are printed at each evaluation
    seed: int = 0  # data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float64 (exact comparisons)
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    stop_at: int = 0  # stop with a checkpoint after this step (0 = run to max_steps)

    def validate(self):
        config.check(self.max_steps > 0, "max_steps", "must be > 0")
        config.check(self.batch_size > 0 and self.grad_accum > 0, "batch_size",
                     "batch_size and grad_accum must be > 0")
        config.check(self.lr > 0, "lr", "must be > 0")
        config.check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


def sft_loss(logits, labels, n_tokens):
    """Summed cross-entropy of the labelled (response) tokens divided by n_tokens, the number of
    response tokens in the whole optimizer batch. logits (B, T, V) predict labels (B, T) shifted by
    one; -100 = not trained."""
    logits, labels = upcast(logits[:, :-1]), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    # (B*(T-1), V) logits against (B*(T-1),) labels
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum") / n_tokens


def collate(examples, pad_id, device):
    """Right-pad (ids, labels) pairs: tokens (B, T), labels (B, T) with -100 on padding. No
    attention mask: with padding on the right only, causal attention already keeps every real
    token from seeing a pad (model.py)."""
    tokens = pad([ids for ids, _ in examples], pad_id)
    labels = pad([lab for _, lab in examples], -100)
    return tokens.to(device), labels.to(device)


def n_trained(example) -> int:
    return sum(1 for t in example[1][1:] if t != -100)  # labels shifted by one, as in sft_loss


@torch.no_grad()
def validation_loss(model, val, pad_id, device, batch_size):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch_size):
        tokens, labels = collate(val[i:i + batch_size], pad_id, device)
        total += sft_loss(model(tokens), labels, 1).item()
        count += sum(n_trained(ex) for ex in val[i:i + batch_size])
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def show_samples(model, tok, prompts):
    """Greedy answers to a few fixed validation prompts: the quickest look at what SFT learned."""
    tokens, _, P = generate(model, prompts, 64, tok.end_id, tok.pad_id, temperature=0)
    for prompt, row in zip(prompts, tokens):
        tqdm.write(f"  {tok.decode(prompt)!r} -> {tok.decode(row[P:].tolist())!r}")


def train(cfg: SFTConfig):
    # 0. set-up: ranks, the parent model (a PPO parent's value head dropped: SFT never reads it,
    #    and DDP stops on an unused parameter), the data, the optimizer, resume
    d = common.init_dist(cfg.device)
    common.set_seed(cfg.seed)
    parent = record.load_checkpoint(cfg.init,
                                    stages=["pretrain", "sft", "distill", "dpo", "ppo", "grpo"])
    tok = record.checkpoint_tokenizer(parent)
    model = GPT.from_checkpoint(parent, d.device, scalar_head=False)
    model = common.with_precision(set_dropout(model, cfg.dropout), cfg.dtype)
    max_len = cfg.max_len or model.config.block_size
    config.check(max_len <= model.config.block_size, "max_len", f"{max_len} > the block_size")
    train_set = tokenize_all(tokenize_sft, tok, load_sft(cfg.data, cfg.skip_bad), max_len)
    val_msgs = load_sft(cfg.val_data, cfg.skip_bad) if cfg.val_data else []
    val_set = tokenize_all(tokenize_sft, tok, val_msgs, max_len)
    samples = [render_chat(tok, msgs[:-1], add_generation_prompt=True)[0]
               for msgs in val_msgs[:cfg.n_samples]]
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay)
    step, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = record.load_checkpoint(ckpt_path, stages=["sft"], tokenizer=tok.name)
        step = record.restore(ckpt, model, optimizer, d)
    raw_model = model
    model = common.wrap_ddp(torch.compile(model) if cfg.compile else model, d)
    log = record.MetricsLog(cfg.out_dir, cfg, d.master, resume_step=step if cfg.resume else None)
    stop = common.StopSignal(d.device)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    if d.master:
        print(f"SFT on {len(train_set):,} examples ({len(val_set):,} val) | {global_batch} "
              f"examples/step | {d.world} rank(s) on {d.device}")

    def save():
        record.save_stage(ckpt_path, d, "sft", raw_model, optimizer, step, cfg, tok, cfg.init)

    bar = common.progress(cfg.max_steps, step, "sft", not d.master)
    t0, last = time.time(), cfg.stop_at if cfg.stop_at > 0 else cfg.max_steps
    while step < min(cfg.max_steps, last):
        # 1. the global batch; N counts its trained tokens (every rank sees all the batch's ids)
        lr = common.lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)
        common.set_lr(optimizer, lr)
        indices = common.batch_indices(len(train_set), step, global_batch, cfg.seed)
        rows = [train_set[i] for i in indices]
        n_tokens = max(1, sum(n_trained(ex) for ex in rows))
        # 2. this rank's micro-batches; the gradient all-reduce waits for the last one
        loss_sum = torch.zeros((), device=d.device)  # a tensor: no host sync per micro-batch
        for micro in range(cfg.grad_accum):
            examples = common.rank_rows(rows, micro, d, cfg.batch_size)
            tokens, labels = collate(examples, tok.pad_id, d.device)
            sync = micro == cfg.grad_accum - 1
            with common.no_sync_unless(model, d, sync), common.autocast(d.device, cfg.dtype):
                # x world: DDP averages the ranks' gradients; each rank's share of the global
                # mean must be summed
                loss = sft_loss(model(tokens), labels, n_tokens) * d.world
            loss.backward()
            loss_sum += loss.detach() / d.world
        # 3. the optimizer step
        common.optimizer_step(model, optimizer, cfg.grad_clip)
        step += 1
        # 4. log; evaluate and checkpoint every eval_interval steps
        loss_all = common.all_reduce_sum(loss_sum).item()
        dt, t0 = time.time() - t0, time.time()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_all:.3f}")
        row = dict(step=step, loss=loss_all, lr=lr, tokens_per_s=n_tokens / dt)
        evaluate = step % cfg.eval_interval == 0 or step == cfg.max_steps
        if evaluate and val_set:
            row["val_loss"] = validation_loss(raw_model, val_set, tok.pad_id, d.device,
                                              cfg.batch_size)
        if evaluate and d.master and samples:
            show_samples(raw_model, tok, samples)
        log.log(**row)  # a NaN loss stops here, before any checkpoint
        if evaluate:
            save()
        if stop.should_stop():
            break
    if step % cfg.eval_interval != 0 and step != cfg.max_steps:
        save()  # stopped early (a signal or stop_at): keep the exact state for --resume
    bar.close()
    common.cleanup_dist()
    return raw_model


def main(argv=None):
    return train(config.parse_config(SFTConfig, argv, __doc__))


if __name__ == "__main__":
    main()
